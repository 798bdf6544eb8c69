#!/usr/bin/env python3
"""What tracing and the RPC counters cost on the hot path: one agent RPC (`Agent.check()`, Health.Check)
through pykata's ttrpc client and server over a unix socket in this process, µs per call.

Runs itself in child processes on two source trees, interleaved --rounds times:
  before   --before-src (default: the main checkout, /work/main/src) as it is
  off      this tree, tracing off (the default configuration): the counters on, no span code run
  on       this tree, tracing on, spans to a JSON-lines file
and prints the medians and the ratios off/before and on/before. A pod start makes ~15 agent RPCs and ~10
QMP commands, each ~1-50 ms under TCG: a per-call difference of a few µs is what "nothing measurable" means.

    .venv/bin/python bench/tracing_bench.py [-n 3000] [--rounds 5] [--before-src /work/main/src]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
    t = time.perf_counter()
    for _ in range(n):
        await agent.check()
    us = (time.perf_counter() - t) / n * 1e6
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before-src", type=Path, default=Path("/work/main/src"))
    args = ap.parse_args()
    results: dict[str, list[float]] = {"before": [], "off": [], "on": []}
    for _ in range(args.rounds):
        results["before"].append(run(args.before_src, "off", args.n))
        results["off"].append(run(HERE, "off", args.n))
        results["on"].append(run(HERE, "on", args.n))
    med = {k: statistics.median(v) for k, v in results.items()}
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"agent RPC round trip (us/call, median of {args.rounds}): before={med['before']:.1f} "
          f"off={med['off']:.1f} on={med['on']:.1f}  off/before={med['off'] / med['before']:.3f} "
          f"on/before={med['on'] / med['before']:.3f}  load={load}")


if __name__ == "__main__":
    main()
