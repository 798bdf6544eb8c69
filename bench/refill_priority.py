#!/usr/bin/env python3
"""Does refilling the warm pool slow the pod starts that emptied it? factory.pool_fill_idle A/B:

    .venv/bin/python bench/refill_priority.py [-n 6] [--refills 4]

Per round and mode (refill at idle priority, at normal priority; the order alternates), a VM is made
as the pool makes one (Sandbox.create_warm), then `--refills` waiting shims are started the way a pod's
shim refills the pool (pykata.factory.pool.fill with pool_fill_idle on or off, forked by a fork server
of the bench's own as a pod's shim has its containerd's fork them; --fresh: fresh `pool-entry`
processes, whose imports run before the waiting shim can lower its priority) and right away the
ready VM is handed out and its busybox container created and started
(adopt + create + start, in this process at normal priority): the wall time of that start, the CPU its
QEMU used, and the CPU the refills used meanwhile. The refills then end (pool destroy). Prints medians
and the load average: what the refill priority does to a start in the same minute, on a shared host.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.claim_cpu import proc_cpu  # noqa: E402
from pykata.config import Config, load_config  # noqa: E402
from pykata.config.load import find_config_path, packaged_default_text  # noqa: E402
from pykata.factory import pool  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.sandbox import Sandbox, build_spec  # noqa: E402
from pykata.shim.forkclient import _launch as launch  # noqa: E402
from pykata.shim.forkclient import fork_pool_entry, server_path, stop  # noqa: E402


def tree_cpu(pid: int) -> float:
    total = 0.0
    try:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            total += proc_cpu(p.pid)
    except psutil.Error:
        pass
    return total


ADDRESS = "pykata-refill-bench"  # the fork server's "containerd address" (no socket: it never exits for it)


async def one(config: Config, runtime: Path, rootfs: Path, n: int, fresh: bool) -> tuple[float, float, float]:
    """(wall seconds of the start, its QEMU's CPU seconds, the refills' CPU seconds meanwhile)."""
    sb = await Sandbox.create_warm(config, runtime / "pool" / f"pool-{n:012x}")
    try:
        assert sb.vm is not None
        qemu = sb.vm.pid
        pool.fill(config, pool.entry_argv(), fork=None if fresh else (
            lambda eid: fork_pool_entry(config.runtime.runtime_dir, ADDRESS, eid)))
        refills = [e.pid for e in pool.list_entries(config) if e.alive]
        q0 = proc_cpu(qemu)
        t0 = time.perf_counter()
        await sb.adopt(f"refillprio{n}", serve_proxy=True)
        c = await sb.create_container("c1", build_spec(["sleep", "1000"], env=["PATH=/bin"]), rootfs)
        await c.start()
        wall = time.perf_counter() - t0
        q = proc_cpu(qemu) - q0
        r = sum(tree_cpu(p) for p in refills)
        return wall, q, r
    finally:
        await sb.stop(remove=True)
        pool.destroy(config)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=6, help="rounds (each one start per mode)")
    ap.add_argument("--refills", type=int, default=4, help="waiting shims started right before each start")
    ap.add_argument("--fresh", action="store_true", help="refills as fresh processes, not forked")
    args = ap.parse_args()
    runtime = Path(tempfile.mkdtemp(prefix="pkrp", dir="/tmp"))  # short: unix socket paths
    rootfs = ImageStore(load_config().runtime.cache_path).resolve("busybox").rootfs
    modes = {}
    for name, idle in (("idle", True), ("normal", False)):
        # each mode its own runtime_dir (and so pool); PYKATA_CONFIG-free: the waiting shims get it by file
        directory = runtime / name
        directory.mkdir()
        found = find_config_path()
        text = found.read_text() if found is not None else packaged_default_text()
        text = re.sub(r"(?m)^runtime_dir\s*=.*$", f'runtime_dir = "{directory}"', text)
        text = re.sub(r"(?m)^pool_size\s*=.*$", f"pool_size = {args.refills}", text)
        text = re.sub(r"(?m)^pool_fill_idle\s*=.*$", f"pool_fill_idle = {'true' if idle else 'false'}", text)
        path = directory / "configuration.toml"
        path.write_text(text)
        modes[name] = path
        if not args.fresh:
            os.environ["PYKATA_CONFIG"] = str(path)
            server = server_path(str(directory), ADDRESS)
            launch(server, ADDRESS)
            deadline = time.monotonic() + 60
            while not server.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    loads = []
    try:
        for i in range(args.n):
            order = list(modes.items()) if i % 2 == 0 else list(modes.items())[::-1]
            for j, (name, path) in enumerate(order):
                os.environ["PYKATA_CONFIG"] = str(path)
                config = load_config()
                assert config.factory.pool_fill_idle == (name == "idle")
                loads.append(os.getloadavg()[0])
                results[name].append(await one(dataclasses.replace(config), Path(config.runtime.runtime_dir),
                                               rootfs, 2 * i + j, args.fresh))
    finally:
        for path in modes.values():
            os.environ["PYKATA_CONFIG"] = str(path)
            pool.destroy(load_config())
            stop(load_config().runtime.runtime_dir, ADDRESS)
        shutil.rmtree(runtime, ignore_errors=True)
    how = "fresh processes" if args.fresh else "forked"
    print(f"a pooled VM's start (adopt + create + start) while {args.refills} refills ({how}) start, median of "
          f"{args.n}; "
          f"load {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'refill priority':<18}{'start s':>9}{'QEMU CPU s':>12}{'refills CPU s':>15}   (each round's start s)")
    for name, rows in results.items():
        w, q, r = (statistics.median(col) for col in zip(*rows, strict=True))
        print(f"{name:<18}{w:9.3f}{q:12.3f}{r:15.3f}   {' '.join(f'{x[0]:.2f}' for x in rows)}")


if __name__ == "__main__":
    asyncio.run(main())
