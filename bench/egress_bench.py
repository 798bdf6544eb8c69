"""Start time and memory of an SDK egress sandbox per user-mode network stack (hypervisor.qemu.user_network):
"slirp" (libslirp in QEMU, QEMU in the host's network namespace) against "passt" (passt beside a QEMU
with an empty network namespace), interleaved, in the same run.

    .venv/bin/python bench/egress_bench.py -n 6

Per start: seconds until `AsyncSandbox(network="egress").start()` returns (a template clone with its
container), then the PSS (MiB) of every process of the sandbox's VM (QEMU, the 9p proxy, passt and
their lifeline wrappers: the processes whose command line names the sandbox), after `--settle` seconds,
and the time of one guest connection through the stack to a server in a test namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pykata  # noqa: E402
from pykata.config import Config, load_config  # noqa: E402
from tests.netns import served_subnet  # noqa: E402

STACKS = ("slirp", "passt")


def _config(stack: str) -> Config:
    config = load_config()
    qemu = dataclasses.replace(config.qemu, user_network=stack)
    return dataclasses.replace(config, hypervisor=dataclasses.replace(config.hypervisor, qemu=qemu))


def _pss_mib(sandbox_id: str) -> tuple[float, int]:
    total, count = 0, 0
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if sandbox_id not in " ".join(proc.info["cmdline"] or ()):
            continue
        try:
            for line in Path(f"/proc/{proc.info['pid']}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    count += 1
        except OSError:
            pass
    return total / 1024, count


async def one(stack: str, settle: float, server: str) -> tuple[float, float, int, float]:
    began = time.monotonic()
    sb = pykata.AsyncSandbox(network="egress", allow=[f"{server}/32"], config=_config(stack))
    await sb.start()
    started = time.monotonic() - began
    try:
        await asyncio.sleep(settle)
        pss, procs = _pss_mib(sb.id)
        t = time.monotonic()
        r = await sb.run(["sh", "-c", f"mkfifo /tmp/i; nc -w 5 {server} 8080 <>/tmp/i"], timeout=60)
        connect = time.monotonic() - t
        if r.stdout != b"port 8080\n":
            raise SystemExit(f"{stack}: the guest's connection failed: {r.stdout!r} {r.stderr!r}")
    finally:
        await sb.close()
    return started, pss, procs, connect


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="starts per stack (interleaved)")
    ap.add_argument("--settle", type=float, default=2.0)
    args = ap.parse_args()
    # a namespace with a server, reached over a veth (the egress tests' own: tests/netns.py)
    with served_subnet("egb", "198.19.77", (8080,)) as net:
        for stack in STACKS:  # warm: templates made, caches filled
            await one(stack, 0, net.near)
        rows: dict[str, list[tuple[float, float, int, float]]] = {s: [] for s in STACKS}
        loads = []
        for i in range(args.n):
            for stack in (STACKS if i % 2 == 0 else STACKS[::-1]):
                loads.append(os.getloadavg()[0])
                rows[stack].append(await one(stack, args.settle, net.near))
    print(f"n={args.n} per stack, interleaved; load (1 min) {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'stack':6} {'start s (median)':>17} {'PSS MiB (median)':>17} {'processes':>9} {'connect s':>10}")
    med = {}
    for stack, r in rows.items():
        med[stack] = [statistics.median(x[k] for x in r) for k in range(4)]
        print(f"{stack:6} {med[stack][0]:17.3f} {med[stack][1]:17.1f} {int(med[stack][2]):9d} {med[stack][3]:10.3f}")
    print(f"passt/slirp: start {med['passt'][0] / med['slirp'][0]:.2f}x, PSS {med['passt'][1] / med['slirp'][1]:.2f}x "
          f"(+{med['passt'][1] - med['slirp'][1]:.1f} MiB)")


if __name__ == "__main__":
    asyncio.run(main())
