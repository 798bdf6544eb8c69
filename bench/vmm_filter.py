#!/usr/bin/env python3
"""What pykata's seccomp filter for QEMU (pykata.hypervisor.fileguard.vmm_child: no io_uring, no
setuid/setgid modes, no i386/x32 calls) costs, in two parts:

    .venv/bin/python bench/vmm_filter.py [-n 6] [--syscalls-only]

1. syscalls: a C loop of 2,000,000 getppid() (built with cc) started under a clone's QEMU filters
   without pykata's (clonememory's only: `clone`) and with it (`clone+vmm`), interleaved; the median
   nanoseconds per call. QEMU's own -sandbox filter comes on top of both alike.
2. vm: template clones with a host volume, each variant started in turn (order reversed every other
   round): `deny` (the filter as shipped) and `allow` (the same filter without the io_uring numbers).
   Per variant the median of: the io_uring descriptors QEMU holds once ready (QEMU 7.2 makes two rings
   at start and closes them at once for its glib main loop, so 0 in both), QEMU CPU seconds to ready,
   and QEMU CPU and wall seconds of a 9p workload in the volume (300 small files written, listed and
   read, 16 MiB written and read back). The host load range is printed beside each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOOP_C = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < 2000000; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 2e6);
    return 0;
}
"""
WORK = ("cd /v && mkdir d && for i in $(seq 300); do echo $i > d/f$i; done && ls -l d >/dev/null && "
        "cat d/* >/dev/null && dd if=/dev/zero of=big bs=64k count=256 2>/dev/null && cat big >/dev/null && "
        "rm -rf d big")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def syscalls(n: int) -> None:
    from pykata.hypervisor import fileguard
    from pykata.hypervisor.qemu.clonememory import keep_template_intact

    def both() -> None:
        keep_template_intact()
        fileguard.vmm_child()

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "loop.c").write_text(LOOP_C)
        subprocess.run(["cc", "-O2", "-o", f"{d}/loop", f"{d}/loop.c"], check=True)
        variants: list[tuple[str, Callable[[], None]]] = [("clone", keep_template_intact), ("clone+vmm", both)]
        res: dict[str, list[float]] = {k: [] for k, _ in variants}
        loads = [load()]
        for i in range(2 * n):
            for name, pre in variants if i % 2 == 0 else variants[::-1]:
                out = subprocess.run([f"{d}/loop"], preexec_fn=pre, capture_output=True, text=True, check=True)
                res[name].append(float(out.stdout))
        loads.append(load())
    for name, v in res.items():
        print(f"syscalls {name:10s} {statistics.median(v):7.1f} ns/call (median of {len(v)})")
    print(f"syscalls +{statistics.median(res['clone+vmm']) - statistics.median(res['clone']):.1f} ns/call; "
          f"load {loads[0]} -> {loads[1]}")


def _cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def _one(deny: bool) -> dict[str, float]:
    import pykata
    from pykata.hypervisor import fileguard
    from pykata.hypervisor.jail import inspect_process

    fileguard.IO_URING_SYSCALLS = (425, 426, 427) if deny else ()  # type: ignore[misc]
    fileguard._PROGRAM = fileguard.filter_program()
    with tempfile.TemporaryDirectory() as vol:
        async with pykata.AsyncSandbox(image="busybox", volumes=[f"{vol}:/v"]) as sb:
            pid = sb._sandbox.vm.pid
            start = _cpu(pid)
            t = time.monotonic()
            r = await sb.exec(["sh", "-c", WORK])
            assert r.exit_code == 0, r
            return {"rings": inspect_process(pid).io_urings, "start_cpu": start, "work_cpu": _cpu(pid) - start,
                    "work_wall": time.monotonic() - t}


async def vms(n: int) -> None:
    res: dict[str, list[dict[str, float]]] = {"deny": [], "allow": []}
    loads = [load()]
    for i in range(n):
        for name in ("deny", "allow") if i % 2 == 0 else ("allow", "deny"):
            res[name].append(await _one(name == "deny"))
        loads.append(load())
    for name, rows in res.items():
        med: dict[str, Any] = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
        print(f"vm {name:5s} " + " ".join(f"{k}={v}" for k, v in med.items()) + f" (median of {len(rows)})")
    print(f"vm load {loads[0]} ... {loads[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=6)
    ap.add_argument("--syscalls-only", action="store_true")
    args = ap.parse_args()
    syscalls(args.n)
    if not args.syscalls_only:
        asyncio.run(vms(args.n))


if __name__ == "__main__":
    main()
