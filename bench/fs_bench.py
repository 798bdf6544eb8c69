#!/usr/bin/env python3
"""Filesystem benchmark: metadata operations on a container's root filesystem, runc vs pykata on the
same bundle, in one run.

A static probe (bench/data/fsbench.c, built with gcc) runs as the container's process on a busybox
bundle to which a tree of 2000 files in 110 directories is added under /usr/share/fsbench:
  create / stat / unlink  N files (default 2000) in /tmp: the container's writable layer
  walk                    readdir + lstat of every entry below /usr: the image's read-only layers
  rewalk                  the same walk again (the guest's dentries and inodes now exist)
Each runtime runs the bundle --runs times (a fresh container each time); the median is reported:
  runc         `runc run` on the host (the baseline)
  pykata       `pykata run` with runtime.rootfs_upper = "guest" (overlay in the guest, upper on tmpfs,
               the image a read-only ext4 disk in an image slot: runtime.rootfs_block_slots)
  pykata-9p    as pykata, the image through the shared directory instead (rootfs_block_slots = 0)
  pykata-host  `pykata run` with runtime.rootfs_upper = "host" (overlay on the host, through 9p/virtio-fs)
  pykata-vfs   as pykata, but a cold-booted VM (factory.enable_template = false)
  pykata-vfs-shared  as pykata-vfs, the image through virtio-fs (rootfs_block_slots = 0)
The pykata columns use the configuration in force ($PYKATA_CONFIG or the packaged one: templated VMs,
so 9p); the others change keys of the packaged configuration. Runtimes take turns within each run.

    .venv/bin/python bench/fs_bench.py [--files 2000] [--runs 3] [--no-host] [--no-vfs] [--no-shared]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from pykata.config.load import packaged_default_text
from pykata.images import ImageStore
from pykata.sandbox import build_spec

ROOT = Path(__file__).resolve().parents[1]
PYKATA = str(ROOT / ".venv/bin/pykata")
PROBE = ROOT / "bench/data/fsbench.c"
OPS = ("create", "stat", "unlink", "walk", "rewalk")


def make_bundle(tmp: Path, files: int) -> Path:
    rootfs = ImageStore(tmp / "cache").resolve("busybox").rootfs
    bundle = tmp / "bundle"
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(bundle / "rootfs/bin/fsbench"), str(PROBE)], check=True)
    tree = bundle / "rootfs/usr/share/fsbench"
    for i in range(10):
        for j in range(10):
            d = tree / f"d{i}" / f"e{j}"
            d.mkdir(parents=True)
            for k in range(20):
                (d / f"f{k}").write_text("x")
    spec = build_spec(["/bin/fsbench", str(files), "/usr"], env=["PATH=/bin"], cwd="/", user=(0, 0),
                      hostname="fsbench")
    spec["linux"]["resources"] = {}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def parse(out: str) -> dict[str, float]:
    figures = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        if name in OPS:
            figures[name] = float(value)
    if set(figures) != set(OPS):
        raise SystemExit(f"fsbench printed {out!r}")
    return figures


def run_runc(bundle: Path) -> dict[str, float]:
    cid = f"fsbench-{uuid.uuid4().hex[:8]}"
    shutil.rmtree(bundle / "rootfs/tmp/fsbench", ignore_errors=True)
    try:
        p = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
        shutil.rmtree(bundle / "rootfs/tmp/fsbench", ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"runc: {p.stderr}")
    return parse(p.stdout)


def run_pykata(bundle: Path, config: Path | None) -> dict[str, float]:
    env = dict(os.environ, **({"PYKATA_CONFIG": str(config)} if config else {}))
    p = subprocess.run([PYKATA, "run", "--rm", str(bundle)], capture_output=True, text=True, timeout=1200, env=env)
    if p.returncode:
        raise SystemExit(f"pykata: {p.stderr}")
    return parse(p.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-host", action="store_true", help="skip rootfs_upper = \"host\" (slow)")
    ap.add_argument("--no-vfs", action="store_true", help="skip the cold-booted virtio-fs VM")
    ap.add_argument("--no-shared", action="store_true", help="skip the image through the shared directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsbench-") as d:
        tmp = Path(d)
        bundle = make_bundle(tmp, args.files)
        configs: dict[str, Path | None] = {"pykata": None}
        text = packaged_default_text()
        shared = ("rootfs_block_slots = 4", "rootfs_block_slots = 0")
        cold = ("enable_template = true", "enable_template = false")
        variants = {
            "pykata-9p": [shared] if not args.no_shared else None,
            "pykata-host": [('rootfs_upper = "guest"', 'rootfs_upper = "host"')] if not args.no_host else None,
            "pykata-vfs": [cold] if not args.no_vfs else None,
            "pykata-vfs-shared": [cold, shared] if not (args.no_vfs or args.no_shared) else None,
        }
        for name, changes in variants.items():
            if changes is None:
                continue
            changed = text
            for old, new in changes:
                if old not in changed:
                    raise SystemExit(f"the packaged configuration has no {old!r}")
                changed = changed.replace(old, new)
            (tmp / f"{name}.toml").write_text(changed)
            configs[name] = tmp / f"{name}.toml"
        results: dict[str, list[dict[str, float]]] = {"runc": [], **{k: [] for k in configs}}
        for _ in range(args.runs):
            results["runc"].append(run_runc(bundle))
            for name, cfg in configs.items():
                results[name].append(run_pykata(bundle, cfg))
    med = {k: {op: statistics.median(r[op] for r in v) for op in OPS} for k, v in results.items()}
    print(f"{args.files} files in /tmp, walk of /usr ({args.runs} runs, median seconds; ratio to runc)")
    print(f"{'operation':<10}" + "".join(f"{k:>24}" for k in med))
    for op in OPS:
        base = med["runc"][op]
        cells = [f"{med['runc'][op]:>24.4f}"]
        for k in configs:
            ratio = med[k][op] / base if base > 0 else float("inf")
            cells.append(f"{med[k][op]:>14.4f} ({ratio:>6.1f}x)")
        print(f"{op:<10}" + "".join(cells))
    print(f"load average at the end: {Path('/proc/loadavg').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
