#!/usr/bin/env python3
"""What the guest's mount of the shared directory (9p) costs in a templated VM, and what it saves a pod
that never needs it (the guest mounts it with the first container that does: agent protocol 10).

    .venv/bin/python bench/share_mount.py [-n 5]

Per round, one sandbox from the template (as a pod start has it) and three containers of the busybox
image in it, one after the other, each `true`:
  disk        root on the image disk, no host volume: the share stays unmounted
  +volume     the same with a host volume: its CreateContainer mounts the share first
  volume      the same again: the share is mounted already
`+volume` - `volume` is the mount: wall ms of create_container and CPU ms of QEMU (all threads) and of
the 9p proxy helper (a jailed QEMU's 9p server), from schedstat. Prints medians over N rounds and the
load average before and after. CreateSandbox's own wall ms is printed beside (what it took without the
mount). The machine is shared: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pykata.config import load_config  # noqa: E402
from pykata.hypervisor.readiness import cpu_seconds  # noqa: E402
from pykata.images.store import ImageStore  # noqa: E402
from pykata.sandbox.ocispec import Volume, build_spec  # noqa: E402
from pykata.sandbox.sandbox import Sandbox  # noqa: E402


def helper_pids(shared_dir: Path) -> list[int]:
    """The virtfs-proxy-helper serving `shared_dir` (none when QEMU serves 9p itself)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"virtfs-proxy-helper") for a in argv) and str(shared_dir).encode() in argv:
            found.append(int(entry))
    return found


async def one_round(busybox: Path, vol: Path) -> dict[str, tuple[float, float, float]]:
    config = load_config()
    began = time.perf_counter()
    sb = await Sandbox.create(config=config, serve_proxy=False)
    out = {"sandbox.create": (time.perf_counter() - began, 0.0, 0.0)}
    try:
        assert sb.vm is not None and sb.vm.pid is not None
        helpers = helper_pids(sb.shared_dir)
        for label, volumes in (("disk", []), ("+volume", [Volume(vol, "/vol")]), ("volume", [Volume(vol, "/vol")])):
            q0, h0 = cpu_seconds(sb.vm.pid), sum(cpu_seconds(p) for p in helpers)
            t0 = time.perf_counter()
            cid = f"{label.strip('+')}-{len(out)}"
            c = await sb.create_container(cid, build_spec(["true"], env=["PATH=/bin"]), busybox, volumes=volumes)
            wall = time.perf_counter() - t0
            out[label] = (wall, cpu_seconds(sb.vm.pid) - q0, sum(cpu_seconds(p) for p in helpers) - h0)
            await c.start()
            await c.wait()
            await c.delete()
    finally:
        await sb.stop()
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    config = load_config()
    busybox = ImageStore(config.runtime.cache_path).resolve("busybox").rootfs
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    rows: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        vol = Path(tmp)
        (vol / "f").write_text("x\n")
        for _ in range(args.n):
            for label, value in (await one_round(busybox, vol)).items():
                rows.setdefault(label, []).append(value)
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}   n={args.n}")
    print(f"{'step':<16}{'wall ms':>10}{'QEMU CPU ms':>14}{'helper CPU ms':>15}")
    for label, values in rows.items():
        med = [1000 * statistics.median(v[i] for v in values) for i in range(3)]
        print(f"{label:<16}{med[0]:>10.1f}{med[1]:>14.1f}{med[2]:>15.1f}")
    mount = [1000 * statistics.median(a[i] - b[i] for a, b in zip(rows["+volume"], rows["volume"], strict=True))
             for i in range(3)]
    print(f"{'mount (diff)':<16}{mount[0]:>10.1f}{mount[1]:>14.1f}{mount[2]:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
