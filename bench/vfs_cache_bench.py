#!/usr/bin/env python3
"""virtio-fs cache modes (`hypervisor.qemu.virtio_fs_cache`: auto, always, none) on a read-write host
volume: coherence with the host's changes and durability when QEMU is killed, per mode, beside 9p
(the templated default), all in one run.

Each mode runs tests/sandbox/coherence.py's probe --runs times in a cold-booted VM (virtio-fs) and once
per run in a template clone (9p): per check, the median time until the container saw the host's change
(STALE: not within 3 s), whether a MAP_SHARED mapping could be made, and whether what the container
msynced, fsynced and wrote without syncing was on the host after SIGKILL of QEMU. Speed per mode:
`bench/fs_bench.py --only-emptydir --variant` cannot change a cold column, so use
`--vfs-cache auto,always,none` there.

    .venv/bin/python bench/vfs_cache_bench.py [--runs 2] [--modes auto,always,none]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykata.config import load_config, with_shared_fs
from tests.sandbox.coherence import Coherence, build_probe, probe_volume


def _config(mode: str | None):  # type: ignore[no-untyped-def]
    config = load_config()
    if mode is None:
        return with_shared_fs(config, "virtio-9p")
    config = with_shared_fs(config, "virtio-fs")
    qemu = dataclasses.replace(config.qemu, virtio_fs_cache=mode)
    return dataclasses.replace(config, hypervisor=dataclasses.replace(config.hypervisor, qemu=qemu))


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--modes", default="auto,always,none")
    args = ap.parse_args()
    columns: dict[str, str | None] = {"9p": None, **{f"vfs-{m}": m for m in args.modes.split(",") if m}}
    results: dict[str, list[Coherence]] = {k: [] for k in columns}
    loads = []
    with tempfile.TemporaryDirectory(prefix="vfscache-") as d:
        probe = build_probe(Path(d))
        for _ in range(args.runs):
            for name, mode in columns.items():
                result, fs = await probe_volume(_config(mode), probe)
                assert fs == ("virtio-9p" if mode is None else "virtio-fs"), fs
                results[name].append(result)
                loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
    checks = list(dict.fromkeys(k for v in results.values() for r in v for k in r.seen))
    width = max(map(len, [*checks, "msync'd mapping on the host"])) + 2
    print(f"{'':{width}}" + "".join(f"{k:>16}" for k in columns))
    for check in checks:
        cells = []
        for name in columns:
            seen = [r.seen.get(check, -1) for r in results[name]]
            if any(s is None for s in seen):
                cells.append(f"STALE {sum(s is None for s in seen)}/{len(seen)}")
            elif any(s == -1 for s in seen):
                cells.append("n/a")
            else:
                cells.append(f"{statistics.median(s for s in seen if s is not None):.0f} ms")
        print(f"{check:{width}}" + "".join(f"{c:>16}" for c in cells))
    print(f"{'MAP_SHARED mmap':{width}}" + "".join(
        f"{(results[n][0].mmap_error or 'ok')[:15]:>16}" for n in columns))
    for what in ("msync'd mapping", "fsync'd write", "unsynced write"):
        print(f"{what + ' on the host':{width}}" + "".join(
            f"{str(sum(r.durable.get(what, False) for r in results[n])) + '/' + str(len(results[n])):>16}"
            for n in columns))
    print(f"load average (1 min) after each probe: min {min(loads):.2f} max {max(loads):.2f}; n={args.runs} per column")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
