#!/usr/bin/env python3
"""What tracing and the RPC counters cost on the hot path: one agent RPC (`Agent.check()`, Health.Check)
through pykata's ttrpc client and server over a unix socket in this process, CPU µs per call (the
process's CPU time, client and server together: on this shared machine wall time moves with the load).

Runs itself in child processes on two source trees, interleaved --rounds times:
  before   --before-src (default: the main checkout, /work/main/src) as it is
  off      this tree, tracing off (the default configuration): the counters on, no span code run
  on       this tree, tracing on, spans to a JSON-lines file
and prints the medians and the ratios off/before and on/before. A pod start makes ~15 agent RPCs and ~10
QMP commands, each ~1-50 ms under TCG: a per-call difference of a few µs is what "nothing measurable" means.

    .venv/bin/python bench/tracing_bench.py [-n 3000] [--rounds 5] [--before-src /work/main/src] [--pods 6]

With --pods N it also runs `ctr run --rm <busybox> true` through a private containerd (tests/shim/harness.py)
N times with tracing off and N times on (alternating; `--runtime-config-path` picks the configuration), and
prints the median pod start+teardown of each and their ratio, beside runc's median from the same run.
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

HERE = Path(__file__).resolve().parents[1] / "src"

CHILD = """
import asyncio, json, sys, tempfile, time, inspect
from pathlib import Path
from pykata.agentapi import Agent
from pykata.protocols.agent import HEALTH_SERVICE, agent_pb2
from pykata.ttrpc import Server, connect_unix

class Health:
    async def Check(self, req, ctx):
        return agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)
    async def Version(self, req, ctx):
        return agent_pb2.VersionCheckResponse()

async def main(n, mode):
    d = Path(tempfile.mkdtemp(prefix="pktb"))
    kwargs = {}
    if "stats" in inspect.signature(Server).parameters:  # as the shim's task server counts
        from pykata.ttrpc.stats import RpcStats
        kwargs["stats"] = RpcStats()
    server = Server(**kwargs)
    server.register(HEALTH_SERVICE, Health())
    await server.serve_unix(str(d / "s"))
    agent = Agent(await connect_unix(str(d / "s")), "bench")
    if mode == "on":
        from pykata import tracing
        tracing.setup(service="bench", file=str(d / "spans.jsonl"))
    for _ in range(200):
        await agent.check()
    t = time.process_time()
    for _ in range(n):
        await agent.check()
    us = (time.process_time() - t) / n * 1e6
    await agent.close()
    await server.close()
    print(json.dumps({"us": us}))

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def run(src: Path, mode: str, n: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(n), mode], capture_output=True, text=True, env=env,
                       check=True, cwd=tempfile.gettempdir())
    return float(json.loads(p.stdout)["us"])


def pods(n: int) -> None:
    sys.path.insert(0, str(HERE.parent))
    import uuid

    from pykata.images import ImageStore
    from pykata.images.builtin import export_oci_archive
    from tests.shim.harness import IMAGE, PYKATA_RUNTIME, RUNC_RUNTIME, Containerd

    d = Path(tempfile.mkdtemp(prefix="pktbp"))
    base = os.environ.get("PYKATA_CONFIG")
    text = Path(base).read_text() if base else ""
    off, on = d / "off.toml", d / "on.toml"
    off.write_text(text)
    on.write_text(f'{text}\n[runtime]\nenable_tracing = true\ntracing_file = "{d / "spans.jsonl"}"\n')
    ctd = Containerd(d / "ctd")
    times: dict[str, list[float]] = {"runc": [], "off": [], "on": []}
    try:
        ctd.start()
        from pykata.config import load_config

        archive = export_oci_archive(ImageStore(load_config().runtime.cache_path).resolve("busybox"),
                                     d / "busybox.tar", IMAGE)
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        for i in range(n + 1):  # the first round warms up
            for kind in ("runc", "off", "on"):
                runtime = RUNC_RUNTIME if kind == "runc" else PYKATA_RUNTIME
                extra = [] if kind == "runc" else ["--runtime-config-path", str(off if kind == "off" else on)]
                t = time.perf_counter()
                ctd.ctr("run", "--rm", "--runtime", runtime, *extra, IMAGE, f"tb{uuid.uuid4().hex[:8]}", "true")
                if i:
                    times[kind].append(time.perf_counter() - t)
    finally:
        ctd.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    spans = sum(1 for _ in (d / "spans.jsonl").open()) if (d / "spans.jsonl").exists() else 0
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"pod start+teardown (ctr run --rm true, s, median of {n}): runc={med['runc']:.2f} "
          f"tracing off={med['off']:.2f} on={med['on']:.2f}  on/off={med['on'] / med['off']:.3f}  "
          f"spans written={spans}  load={load}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before-src", type=Path, default=Path("/work/main/src"))
    ap.add_argument("--pods", type=int, default=0)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"before": [], "off": [], "on": []}
    for _ in range(args.rounds):
        results["before"].append(run(args.before_src, "off", args.n))
        results["off"].append(run(HERE, "off", args.n))
        results["on"].append(run(HERE, "on", args.n))
    med = {k: statistics.median(v) for k, v in results.items()}
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"agent RPC round trip (CPU us/call, median of {args.rounds}): before={med['before']:.1f} "
          f"off={med['off']:.1f} on={med['on']:.1f}  off/before={med['off'] / med['before']:.3f} "
          f"on/before={med['on'] / med['before']:.3f}  load={load}")
    if args.pods:
        pods(args.pods)


if __name__ == "__main__":
    main()
