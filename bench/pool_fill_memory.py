#!/usr/bin/env python3
"""Memory of the warm pool's waiting VMs as `pykata factory pool fill` makes them: forked by the shims'
fork server (`--address <containerd>`) against fresh processes (`--address ""`), in the same run.

    .venv/bin/python bench/pool_fill_memory.py [--size 4] [--rounds 2] [--settle 5] [--json]

A private containerd (tests/shim/harness.py) with a configuration of factory.pool_size = --size and a
runtime directory of its own; one `ctr run --rm` launches its shims' fork server (as any pod's `start`
does). Then, --rounds times, each way in turn: the pool is destroyed, the CLI fills it (`--wait`), and
after --settle seconds each waiting VM is read from /proc/<pid>/smaps_rollup: the waiting shim's PSS,
the PSS of everything below it (QEMU, its lifeline wrappers, the 9p helper), and the fork server's PSS
divided by the waiting VMs (it runs either way, for the pods' shims; the pages it shares with the shims it
forked are split among them, so its own PSS falls when they are there). Per waiting VM: the three added
(what the host holds for the pool and the server, divided by the VMs). Prints MiB per waiting VM and
forked/fresh ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.ctr_bench import pool_config  # noqa: E402
from pykata.config import load_config  # noqa: E402
from pykata.factory import pool  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd, running_with_busybox  # noqa: E402


def pss_mib(pid: int) -> float:
    """The process's PSS in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def below(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def fill_and_measure(ctd: Containerd, address: str, size: int, settle: float) -> dict[str, Any]:
    config = load_config()
    pool.destroy(config)
    started = time.monotonic()
    out = subprocess.run([str(Path(sys.executable).parent / "pykata"), "factory", "pool", "fill", "--wait", "600",
                          "--address", address], capture_output=True, text=True, check=True,
                         stdin=subprocess.DEVNULL).stdout.strip()
    wall = time.monotonic() - started
    entries = [e for e in pool.list_entries(config) if e.alive and e.ready]
    if len(entries) != size:
        raise SystemExit(f"the pool holds {len(entries)} ready VMs, not {size}: {out}")
    time.sleep(settle)
    server = ctd.fork_server_pid()
    forked = [e for e in entries if server is not None and psutil.Process(e.pid).ppid() == server]
    shim = [pss_mib(e.pid) for e in entries]
    rest = [sum(pss_mib(p) for p in below(e.pid)) for e in entries]
    server_mib = pss_mib(server) if server is not None else 0.0
    share = server_mib / len(entries)
    return {"way": "forked" if address else "fresh", "cli": out, "fill_wall_s": round(wall, 2),
            "forked": len(forked), "loadavg": os.getloadavg(),
            "shim_mib": round(statistics.mean(shim), 2), "below_shim_mib": round(statistics.mean(rest), 2),
            "server_mib": round(server_mib, 2), "server_share_mib": round(share, 2),
            "per_vm_mib": round(statistics.mean(shim) + statistics.mean(rest) + share, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pool-fill-memory-"))
    os.environ["PYKATA_CONFIG"] = str(pool_config(tmp, args.size))
    config = load_config()
    results: list[dict[str, Any]] = []
    try:
        with running_with_busybox(Containerd(tmp / "ctd"), tmp / "cache") as ctd:
            pool.destroy(config)
            ctd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, "pool-fill-memory", "true")
            deadline = time.monotonic() + 60
            while ctd.fork_server_pid() is None:
                if time.monotonic() > deadline:
                    raise SystemExit("no shims' fork server was launched")
                time.sleep(0.1)
            for _ in range(args.rounds):
                for address in (str(ctd.socket), ""):
                    r = fill_and_measure(ctd, address, args.size, args.settle)
                    results.append(r)
                    if args.json:
                        print(json.dumps(r), flush=True)
                    else:
                        print(f"[{r['way']}] load {r['loadavg'][0]:.1f}, fill {r['fill_wall_s']} s ({r['cli']}): "
                              f"{r['per_vm_mib']} MiB PSS per waiting VM: shim {r['shim_mib']}, below it "
                              f"{r['below_shim_mib']}, fork server share {r['server_share_mib']} "
                              f"(server {r['server_mib']})", flush=True)
            pool.destroy(config)
    finally:
        pool.destroy(config)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    if not args.json:
        for key in ("shim_mib", "per_vm_mib"):
            forked = statistics.mean(r[key] for r in results if r["way"] == "forked")
            fresh = statistics.mean(r[key] for r in results if r["way"] == "fresh")
            print(f"{key}: forked {forked:.2f} / fresh {fresh:.2f} = {forked / fresh:.3f}")


if __name__ == "__main__":
    main()
