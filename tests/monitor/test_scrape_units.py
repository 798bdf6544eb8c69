"""The scrape against a fake hostile agent (a ttrpc server in this process standing in for a sandbox's
agent proxy): out-of-bounds answers drop the guest's figures and count an error; the host figures stay."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pykata.config import load_config
from pykata.config.schema import Config
from pykata.monitor.scrape import Scraper
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE, agent_pb2
from pykata.sandbox import state
from pykata.ttrpc import CallContext, Server


class FakeHostileAgent:
    """Answers GetGuestDetails and StatsContainer with what `answers` holds."""

    def __init__(self) -> None:
        self.details = agent_pb2.GuestDetailsResponse(online_cpus=1, mem_total_bytes=1 << 30)
        self.stats = agent_pb2.StatsContainerResponse()
        self.stats.cgroup_stats.memory.usage = 1 << 20
        self.stats.cgroup_stats.pids.current = 2

    def __getattr__(self, rpc: str) -> Any:
        async def answer(req: Any, ctx: CallContext) -> Any:
            return {"GetGuestDetails": self.details, "StatsContainer": self.stats}[rpc]
        return answer


@pytest.fixture
async def fake_sandbox() -> AsyncIterator[tuple[Config, FakeHostileAgent, str]]:
    d = Path(tempfile.mkdtemp(prefix="pkfake", dir="/tmp"))
    base = load_config()
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(d)))
    sid = "fake-sandbox"
    record = state.SandboxRecord(id=sid, owner_pid=os.getpid(), created_at=time.time(), status="running",
                                 containers={"c1": state.ContainerRecord(id="c1", status="running")})
    state.save(d / "sandboxes" / sid, record)
    agent = FakeHostileAgent()
    server = Server()
    server.register(AGENT_SERVICE, agent)
    server.register(HEALTH_SERVICE, agent)
    await server.serve_unix(str(d / "sandboxes" / sid / "agent.sock"))
    try:
        yield config, agent, sid
    finally:
        await server.close()
        shutil.rmtree(d, ignore_errors=True)


def samples(families: dict[str, Any], name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), v) for labels, v in families[name].samples]


async def test_honest_answers_are_reported(fake_sandbox: tuple[Config, FakeHostileAgent, str]) -> None:
    config, _, sid = fake_sandbox
    f = await Scraper(config).scrape()
    assert samples(f, "pykata_agent_up") == [({"sandbox_id": sid}, 1.0)]
    assert samples(f, "pykata_guest_memory_total_bytes") == [({"sandbox_id": sid}, float(1 << 30))]
    assert samples(f, "pykata_guest_container_pids") == [({"sandbox_id": sid, "container_id": "c1"}, 2.0)]
    assert samples(f, "pykata_shim_threads")[0][1] >= 1  # the owner (this process) is read from /proc


@pytest.mark.parametrize("lie", ["cpus", "memory", "pids", "usage"])
async def test_an_out_of_bounds_answer_drops_the_guest_figures(
        fake_sandbox: tuple[Config, FakeHostileAgent, str], lie: str) -> None:
    config, agent, sid = fake_sandbox
    if lie == "cpus":
        agent.details.online_cpus = 1 << 31
    elif lie == "memory":
        agent.details.mem_total_bytes = (1 << 64) - 1
    elif lie == "pids":
        agent.stats.cgroup_stats.pids.current = 1 << 40
    else:
        agent.stats.cgroup_stats.memory.usage = 1 << 62
    scraper = Scraper(config)
    f = await scraper.scrape()
    assert samples(f, "pykata_agent_up") == [({"sandbox_id": sid}, 0.0)]
    assert not any(samples(f, name) for name in f if name.startswith("pykata_guest_"))
    assert samples(f, "pykata_monitor_scrape_errors") == [({"sandbox_id": sid, "stage": "agent"}, 1.0)]
    assert samples(f, "pykata_shim_threads")  # the host's own figures stay
