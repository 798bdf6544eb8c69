#!/usr/bin/env python3
"""Resize latency: CRI UpdateContainerResources on a running pykata pod (the VM's balloon follows,
pykata.shim.tasks.resize) against the same call on a runc pod (a cgroup write), in one run; and
Sandbox.resize itself (SDK) for memory grow, memory shrink and CPU changes.

    .venv/bin/python bench/resize_bench.py [-n 20]

Prints p50/p99 per kind and the ratio pykata/runc of the CRI medians, with the load average (other VMs on
this 2-core machine slow the guest's balloon driver: TCG).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
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
from pykata.config import Config, load_config, load_config_file  # noqa: E402
from pykata.factory import ensure_template  # noqa: E402

MIB = 1 << 20
CEILING = 2048


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(1000 * pct(values, 50), 1), "p99_ms": round(1000 * pct(values, 99), 1)}


def cri_updates(n: int) -> dict[str, Any]:
    """UpdateContainerResources (what `crictl update` and kubelet's in-place resize send) on a running
    container of a runc pod and of a pykata pod, interleaved. (Debian's ctr 1.6.20 has no `task update`.)"""
    from cri_api.v1 import api_pb2

    from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd

    tmp = Path(tempfile.mkdtemp(prefix="rsz-bench-"))
    templates = Path(tempfile.mkdtemp(prefix="pkrb", dir="/run"))  # its own: no wait for others' template lock
    ctd = CriContainerd(tmp / "cri", runtime_config={"default_memory": "512", "default_maxmemory": str(CEILING),
                                                      "template_path": f'"{templates}"', "boot_timeout": "120.0"})
    out: dict[str, Any] = {}
    try:
        ctd.start()
        ctd.import_images(tmp / "cache")
        asyncio.run(ensure_template(load_config_file(ctd.dir / "pykata.toml"), nics=1))
        with Cri(ctd.socket) as cri:
            containers = {}
            for handler in ("runc", "pykata"):
                pod_id, pod_config = cri.run_pod(f"rsz-{handler}-{uuid.uuid4().hex[:6]}", handler)
                config = api_pb2.ContainerConfig(
                    metadata=api_pb2.ContainerMetadata(name="app"), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
                    command=["sleep", "3600"], linux=api_pb2.LinuxContainerConfig(
                        resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=256 * MIB)))
                cid = cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=cri.timeout).container_id
                cri.start_container(cid)
                containers[handler] = cid
            times: dict[str, list[float]] = {h: [] for h in containers}
            sizes = [1024, 256, 1536, 512, 768]
            for i in range(n):  # interleaved: both see the same load
                for handler, cid in containers.items():
                    started = time.perf_counter()
                    cri.rt.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
                        container_id=cid, linux=api_pb2.LinuxContainerResources(
                            memory_limit_in_bytes=sizes[i % len(sizes)] * MIB)), timeout=cri.timeout)
                    times[handler].append(time.perf_counter() - started)
            for handler, values in times.items():
                out[handler] = summary(values)
            out["ratio_p50_pykata_to_runc"] = round(statistics.median(times["pykata"]) /
                                                   statistics.median(times["runc"]), 1)
    finally:
        ctd.stop()
        shutil.rmtree(templates, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


async def sdk_resizes(n: int) -> dict[str, Any]:
    base = load_config()
    templates = Path(tempfile.mkdtemp(prefix="pkrb", dir="/run"))
    config = dataclasses.replace(base, hypervisor=dataclasses.replace(base.hypervisor, qemu=dataclasses.replace(
        base.qemu, default_memory=1024, default_maxmemory=CEILING, default_maxvcpus=2, boot_timeout=120.0)),
        factory=dataclasses.replace(base.factory, template_path=str(templates)))
    try:
        await ensure_template(config)
        return await _sdk_resizes(config, n)
    finally:
        shutil.rmtree(templates, ignore_errors=True)


async def _sdk_resizes(config: Config, n: int) -> dict[str, Any]:
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
    result: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in psutil.getloadavg()]}
    result["cri_update_container_resources"] = cri_updates(args.n)
    print(json.dumps(result, indent=1), flush=True)
    result["sandbox_resize"] = asyncio.run(sdk_resizes(args.n))
    result["loadavg_after"] = [round(x, 2) for x in psutil.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
