#!/usr/bin/env python3
"""What the warm pool's warm-up (factory.pool_warm_up, agent WarmUp) buys the first container of a
pooled VM, measured through the Sandbox API (no containerd, no shim):

    .venv/bin/python bench/pool_warmup.py [-n 3]

Per round and per mode (warm-up on, off; interleaved), a VM is made as the pool makes one
(Sandbox.create_warm: restored from the template, reseeded, warmed up or not, paused), handed out
(adopt: resumed, clock, CreateSandbox), then two busybox containers are created one after the
other; the figure is the wall time of each CreateContainer as the host sees it (storages, bundle,
crun create in the guest). The second create shows the floor a fully warm VM reaches. Prints the
medians and the load average (the machine is shared: compare the columns of one run).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pykata.config import Config, load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.sandbox import Sandbox, build_spec  # noqa: E402

AGENT_LINE = re.compile(r"created container (c\d) .* in (\d+) ms: \d+ storages (\d+), bundle (\d+), crun create (\d+)")


async def one(config: Config, runtime: Path, rootfs: Path, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """([seconds to make the pooled VM, first CreateContainer, second CreateContainer], the agent's
    split of each create from the guest's console: {"c1": [total, storages, bundle, crun] in ms})."""
    directory = runtime / "pool" / f"pool-{n:012x}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sb = await Sandbox.create_warm(config, directory)
    made = time.perf_counter() - t0
    try:
        await sb.adopt(f"warmbench{n}", serve_proxy=False)
        spec = build_spec(["true"], env=["PATH=/bin"])
        times = []
        for cid in ("c1", "c2"):
            t = time.perf_counter()
            await sb.create_container(cid, spec, rootfs)
            times.append(time.perf_counter() - t)
        console = getattr(sb.vm, "console_log", None)
        text = console.read_text(errors="replace") if isinstance(console, Path) and console.exists() else ""
        split = {m[1]: [float(x) for x in m.groups()[1:]] for m in AGENT_LINE.finditer(text)}
        return [made, times[0], times[1]], split
    finally:
        await sb.stop(remove=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3, help="rounds (each makes one VM per mode)")
    args = ap.parse_args()
    base = load_config()
    runtime = Path(tempfile.mkdtemp(prefix="pkwb", dir="/tmp"))  # short: unix socket paths
    rootfs = ImageStore(base.runtime.cache_path).resolve("busybox").rootfs
    modes = {"warm-up": True, "no warm-up": False}
    results: dict[str, list[list[float]]] = {m: [] for m in modes}
    splits: dict[str, list[dict[str, list[float]]]] = {m: [] for m in modes}
    try:
        for i in range(args.n):
            # the order alternates between rounds: a round's two VMs are made close in time, and a
            # load that changes during the run favours neither mode
            order = list(modes.items()) if i % 2 == 0 else list(modes.items())[::-1]
            for j, (mode, on) in enumerate(order):
                config = dataclasses.replace(
                    base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(runtime)),
                    factory=dataclasses.replace(base.factory, pool_warm_up=on))
                times, split = await one(config, runtime, rootfs, 2 * i + j)
                results[mode].append(times)
                splits[mode].append(split)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"pooled VM, median of {args.n} (ms); load average {load}")
    print(f"{'':<12}{'make (pool)':>13}{'1st create':>12}{'2nd create':>12}")
    for mode, rows in results.items():
        med = [1000 * statistics.median(col) for col in zip(*rows, strict=True)]
        print(f"{mode:<12}{med[0]:>13.0f}{med[1]:>12.0f}{med[2]:>12.0f}")
    paired = [1000 * (a[1] - b[1]) for a, b in zip(results["warm-up"], results["no warm-up"], strict=True)]
    print(f"1st create, warm-up minus no warm-up, per round (ms): {' '.join(f'{d:+.0f}' for d in paired)}; "
          f"median {statistics.median(paired):+.0f}")
    print("in the guest (agent's console line), median ms: total = storages + bundle + crun create")
    for mode, rounds in splits.items():
        for cid in ("c1", "c2"):
            rows = [r[cid] for r in rounds if cid in r]
            if rows:
                t, st, b, c = (statistics.median(col) for col in zip(*rows, strict=True))
                print(f"  {mode:<12} {cid}: {t:5.0f} = {st:4.0f} + {b:3.0f} + {c:4.0f}")


if __name__ == "__main__":
    asyncio.run(main())
