#!/usr/bin/env python3
"""containerd with pykata against containerd with runc, measured in one run.

    .venv/bin/python bench/ctr_bench.py [-n 5] [--containers 1,10] [--tb-sizes 0,32] [--json]

A private containerd (tests/shim/harness.py: own root, state, socket; the venv's shim on its PATH)
with a local busybox image. Prints:
- the median wall time of `ctr run --rm <busybox> true` with io.containerd.runc.v2 and with
  io.containerd.pykata.v2, and their ratio (one warm-up run each first, not counted);
- host memory per running container (`sleep` in each): the PSS of its shim, QEMU and virtiofsd
  (from /proc/<pid>/smaps_rollup), for 1 and for 10 containers running at once (PSS splits pages
  shared between VMs, such as a VM template's, among them), with runc's shim and container as a
  reference.
With --tb-sizes, both are measured for each TCG translation cache size (MiB; 0 = QEMU's default),
each pykata container run with a configuration file that sets hypervisor.qemu.tcg_tb_size
(`ctr run --runtime-config-path`), all in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.images.builtin import export_oci_archive  # noqa: E402
from pykata.sandbox import sandboxes_dir  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_rm(ctd: Containerd, runtime: str, opts: tuple[str, ...] = ()) -> float:
    cid = f"bench-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    p = ctd.ctr("run", "--rm", "--runtime", runtime, *opts, IMAGE, cid, "true", check=False)
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"ctr run --runtime {runtime} failed: {p.stderr.decode(errors='replace')}")
    return elapsed


def container_processes(ctd: Containerd, cid: str) -> dict[str, list[int]]:
    """The host processes that exist for one container: its shim and what it started (QEMU,
    virtiofsd: found by the sandbox directory or VM name in their command lines), or for runc the
    shim and the container's processes (the shim's children)."""
    shim = psutil.Process(int((ctd.bundle(cid) / "shim.pid").read_text())) \
        if (ctd.bundle(cid) / "shim.pid").exists() else None
    if shim is None:  # runc: the shim that names the container in its command line
        shim = next(p for p in ctd.shims() if cid in p.cmdline())
    out: dict[str, list[int]] = {"shim": [shim.pid], "qemu": [], "virtiofsd": [], "container": []}
    marks = (f"{sandboxes_dir(load_config()) / cid}/", f"pykata-{cid},")
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not any(m in cmd for m in marks):
            continue
        if "qemu-system" in cmd:
            out["qemu"].append(p.pid)
        elif "virtiofsd" in cmd:
            out["virtiofsd"].append(p.pid)
    if not out["qemu"]:
        out["container"] = [c.pid for c in shim.children(recursive=True)]
    return out


def memory(ctd: Containerd, runtime: str, count: int, opts: tuple[str, ...] = ()) -> dict[str, Any]:
    ids = [f"mem-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    try:
        for cid in ids:
            ctd.ctr("run", "-d", "--runtime", runtime, *opts, IMAGE, cid, "sleep", "1000000")
        time.sleep(3)  # let the guests settle (page cache, agent start-up garbage)
        totals: dict[str, int] = {}
        for cid in ids:
            for kind, pids in container_processes(ctd, cid).items():
                totals[kind] = totals.get(kind, 0) + sum(pss_kib(p) for p in pids)
        per = {k: v / count / 1024 for k, v in totals.items() if v}
        return {"runtime": runtime, "containers": count, "pss_mib_per_container": round(sum(per.values()), 1),
                "breakdown_mib": {k: round(v, 1) for k, v in per.items()}}
    finally:
        for cid in ids:
            ctd.remove(cid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=5)
    ap.add_argument("--containers", default="1,10", help="comma-separated container counts for memory")
    ap.add_argument("--tb-sizes", default="0", help="comma-separated tcg_tb_size values (MiB, 0 = default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.containers.split(",") if c]
    tb_sizes = [int(t) for t in args.tb_sizes.split(",") if t]

    tmp = Path(tempfile.mkdtemp(prefix="ctr-bench-"))
    ctd = Containerd(tmp / "ctd")
    result: dict[str, Any] = {}
    try:
        ctd.start()
        image = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox")
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0],
                str(export_oci_archive(image, tmp / "busybox.tar", IMAGE)))
        variants: dict[str, tuple[str, ...]] = {RUNC_RUNTIME: ()}
        for tb in tb_sizes:
            name = PYKATA_RUNTIME if tb == 0 else f"{PYKATA_RUNTIME} tb-size={tb}"
            if tb == 0:
                variants[name] = ()
            else:
                cfg = tmp / f"tb{tb}.toml"
                cfg.write_text(f"[hypervisor.qemu]\ntcg_tb_size = {tb}\n")
                variants[name] = ("--runtime-config-path", str(cfg))
        runtime_of = {name: RUNC_RUNTIME if name == RUNC_RUNTIME else PYKATA_RUNTIME for name in variants}
        for name, opts in variants.items():
            run_rm(ctd, runtime_of[name], opts)  # warm-up: caches, and the VM template on a first pykata run
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, opts in variants.items():
                times[name].append(run_rm(ctd, runtime_of[name], opts))
        runc = statistics.median(times[RUNC_RUNTIME])
        result["run_rm_true"] = [
            {"variant": name, "runs": args.runs, "runc_s": round(runc, 3),
             "median_s": round(statistics.median(ts), 3), "ratio": round(statistics.median(ts) / runc, 1),
             "all_s": [round(t, 3) for t in ts]}
            for name, ts in times.items() if name != RUNC_RUNTIME]
        result["memory"] = [memory(ctd, RUNC_RUNTIME, 1)] + [
            {**memory(ctd, runtime_of[name], n, opts), "runtime": name}
            for name, opts in variants.items() if name != RUNC_RUNTIME for n in counts]
    finally:
        ctd.stop()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for r in result["run_rm_true"]:
        print(f"ctr run --rm busybox true (median of {r['runs']}): runc {r['runc_s']:.3f} s, "
              f"{r['variant']} {r['median_s']:.3f} s, ratio {r['ratio']}x  (runs: {r['all_s']})")
    for m in result["memory"]:
        parts = ", ".join(f"{k} {v}" for k, v in m["breakdown_mib"].items())
        print(f"memory, {m['runtime']}, {m['containers']} running: {m['pss_mib_per_container']} MiB PSS per "
              f"container ({parts})")


if __name__ == "__main__":
    main()
