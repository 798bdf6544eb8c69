#!/usr/bin/env python3
"""Resize latency: `ctr task update --memory-limit` on a running pykata pod (the VM's balloon follows,
pykata.shim.tasks.resize) against the same command on a runc container (a cgroup write), in one run;
and Sandbox.resize itself (SDK, no ctr) for memory grow, memory shrink and CPU changes.

    .venv/bin/python bench/resize_bench.py [-n 20]

Prints p50/p99 per kind and the ratio pykata/runc of the ctr medians, with the load average (other VMs on
this 2-core machine slow the guest's balloon driver: TCG).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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

import pykata  # noqa: E402
from pykata.config import load_config  # noqa: E402
from pykata.images import ImageStore  # noqa: E402
from pykata.images.builtin import export_oci_archive  # noqa: E402
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402

MIB = 1 << 20
CEILING = 2048


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(1000 * pct(values, 50), 1), "p99_ms": round(1000 * pct(values, 99), 1)}


def ctr_updates(n: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="rsz-bench-"))
    ctd = Containerd(tmp / "ctd")
    cfg = tmp / "elastic.toml"
    cfg.write_text(f"[hypervisor.qemu]\ndefault_memory = 512\ndefault_maxmemory = {CEILING}\n")
    out: dict[str, Any] = {}
    try:
        ctd.start()
        image = ImageStore(Path(load_config().runtime.cache_dir)).resolve("busybox")
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0],
                str(export_oci_archive(image, tmp / "busybox.tar", IMAGE)))
        tasks = {}
        for runtime, opts in ((RUNC_RUNTIME, ()), (PYKATA_RUNTIME, ("--runtime-config-path", str(cfg)))):
            cid = f"rsz-{uuid.uuid4().hex[:8]}"
            ctd.ctr("run", "-d", "--runtime", runtime, *opts, "--memory-limit", str(256 * MIB), IMAGE, cid,
                    "sleep", "1000000")
            tasks[runtime] = cid
        times: dict[str, list[float]] = {r: [] for r in tasks}
        sizes = [1024, 256, 1536, 512, 768]
        for i in range(n):  # interleaved: both see the same load
            for runtime, cid in tasks.items():
                started = time.perf_counter()
                ctd.ctr("task", "update", "--memory-limit", str(sizes[i % len(sizes)] * MIB), cid)
                times[runtime].append(time.perf_counter() - started)
        for runtime, values in times.items():
            out[runtime] = summary(values)
        out["ratio_p50_pykata_to_runc"] = round(statistics.median(times[PYKATA_RUNTIME]) /
                                               statistics.median(times[RUNC_RUNTIME]), 1)
        for cid in tasks.values():
            ctd.remove(cid)
    finally:
        ctd.stop()
    return out


async def sdk_resizes(n: int) -> dict[str, Any]:
    base = load_config()
    config = dataclasses.replace(base, hypervisor=dataclasses.replace(base.hypervisor, qemu=dataclasses.replace(
        base.qemu, default_memory=1024, default_maxmemory=CEILING, default_maxvcpus=2)))
    kinds: dict[str, list[float]] = {"memory_grow_512": [], "memory_shrink_512": [], "cpus_1_to_2": [],
                                     "cpus_2_to_1": []}
    async with pykata.AsyncSandbox(image="busybox", memory_mib=768, cpus=1, config=config) as sb:
        for _ in range(n):
            for kind, kwargs in (("memory_grow_512", {"memory_mib": 1280}), ("memory_shrink_512", {"memory_mib": 768}),
                                 ("cpus_1_to_2", {"cpus": 2}), ("cpus_2_to_1", {"cpus": 1})):
                started = time.perf_counter()
                await sb.resize(**kwargs)  # type: ignore[arg-type]
                kinds[kind].append(time.perf_counter() - started)
    return {k: summary(v) for k, v in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load = [round(x, 2) for x in psutil.getloadavg()]
    result = {"loadavg_before": load, "ctr_task_update": ctr_updates(args.n),
              "sandbox_resize": asyncio.run(sdk_resizes(args.n)),
              "loadavg_after": [round(x, 2) for x in psutil.getloadavg()]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
