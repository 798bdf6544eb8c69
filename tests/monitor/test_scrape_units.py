"""The scrape against a fake hostile agent (a ttrpc server in this process standing in for a sandbox's
agent proxy): out-of-bounds answers drop the guest's figures and count an error; the host figures stay."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pykata.config import load_config
from pykata.config.schema import Config
from pykata.errors import Unimplemented
from pykata.monitor.collector import Collector
from pykata.monitor.scrape import Scraper
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE, PROTOCOL_VERSION, agent_pb2
from pykata.protocols.owner import OWNER_SERVICE, owner_pb2
from pykata.sandbox import state
from pykata.ttrpc import CallContext, Server


class FakeHostileAgent:
    """A fake of the agent (GetGuestMetrics, StatsContainer) and of the owner (Owner.Metrics) behind the
    proxy socket, answering what its attributes hold."""

    def __init__(self) -> None:
        self.metrics = agent_pb2.GuestMetrics(online_cpus=1, uptime_ns=5 * 10**9)
        self.metrics.memory.total = 1 << 30
        self.metrics.load.load1 = 0.5
        self.metrics.agent.threads = 3
        self.metrics.interfaces.add(name="eth0", rx_bytes=1000)
        self.metrics.disks.add(name="vda", read_bytes=4096)
        self.stats = agent_pb2.StatsContainerResponse()
        self.stats.cgroup_stats.memory.usage = 1 << 20
        self.stats.cgroup_stats.pids.current = 2
        self.owner = owner_pb2.OwnerMetrics(events_dropped=4)
        self.owner.served.add(method="Create", calls=2, errors=1, seconds=0.5)
        self.calls: list[str] = []
        self.details = agent_pb2.GuestDetailsResponse(online_cpus=1, mem_total_bytes=1 << 30)
        self.old = False  # an agent before GetGuestMetrics: answers it UNIMPLEMENTED
        self.tick = True  # whether its coarse clock moves (a guest with a timer tick)
        self._frozen_tick = time.monotonic_ns()
        self.protocol = PROTOCOL_VERSION  # what it says in Version

    def __getattr__(self, rpc: str) -> Any:
        async def answer(req: Any, ctx: CallContext) -> Any:
            self.calls.append(rpc)
            if self.old and rpc == "GetGuestMetrics":
                raise Unimplemented("no such method")
            if rpc == "Check":
                now = time.monotonic_ns()
                return agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING, clock_ns=now,
                                                     tick_clock_ns=now if self.tick else self._frozen_tick)
            if rpc == "Version":
                return agent_pb2.VersionCheckResponse(agent_version="fake", protocol_version=self.protocol)
            return {"GetGuestDetails": self.details, "GetGuestMetrics": self.metrics, "StatsContainer": self.stats,
                    "Metrics": self.owner}[rpc]
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
    server.register(OWNER_SERVICE, agent)
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
    scraper = Scraper(config)
    f = await scraper.scrape()
    me = {"sandbox_id": sid}
    assert samples(f, "pykata_agent_up") == [(me, 1.0)]
    assert samples(f, "pykata_guest_memory_total_bytes") == [(me, float(1 << 30))]
    assert samples(f, "pykata_guest_container_pids") == [({**me, "container_id": "c1"}, 2.0)]
    assert samples(f, "pykata_guest_load1") == [(me, 0.5)]
    assert samples(f, "pykata_guest_uptime_seconds") == [(me, 5.0)]
    assert samples(f, "pykata_guest_network_receive_bytes") == [({**me, "interface": "eth0"}, 1000.0)]
    assert samples(f, "pykata_guest_disk_read_bytes") == [({**me, "disk": "vda"}, 4096.0)]
    assert samples(f, "pykata_agent_threads") == [(me, 3.0)]
    assert samples(f, "pykata_shim_rpc") == [({**me, "method": "Create"}, 2.0)]
    assert samples(f, "pykata_shim_rpc_errors") == [({**me, "method": "Create"}, 1.0)]
    assert samples(f, "pykata_shim_events_dropped") == [(me, 4.0)]
    assert samples(f, "pykata_shim_threads")[0][1] >= 1  # the owner (this process) is read from /proc
    await scraper.close()


async def test_a_guest_whose_tick_died_is_reported_by_the_next_collection(
        fake_sandbox: tuple[Config, FakeHostileAgent, str]) -> None:
    """The collections' Check answers compare the guest's two clocks (Agent.connect's dead-tick check, kept
    up for the sandbox's life at one small call per collection): no figure after the first collection,
    0 while the coarse clock moves, 1 once it stood still for a whole interval."""
    config, agent, sid = fake_sandbox
    scraper = Scraper(config)
    me = {"sandbox_id": sid}
    assert samples(await scraper.scrape(), "pykata_guest_tick_stalled") == []
    await asyncio.sleep(0.25)
    assert samples(await scraper.scrape(), "pykata_guest_tick_stalled") == [(me, 0.0)]
    agent.tick = False
    agent._frozen_tick = time.monotonic_ns()
    await scraper.scrape()
    await asyncio.sleep(0.25)  # replies.TICK_STALL_NS
    f = await scraper.scrape()
    assert samples(f, "pykata_guest_tick_stalled") == [(me, 1.0)]
    assert samples(f, "pykata_agent_up") == [(me, 1.0)]  # it answers: only its tick is dead
    assert agent.calls.count("Check") == 4
    await scraper.close()


@pytest.mark.parametrize("lie", ["cpus", "memory", "pids", "usage", "load", "interface", "interfaces",
                                 "agent_rss"])
async def test_an_out_of_bounds_answer_drops_the_guest_figures(
        fake_sandbox: tuple[Config, FakeHostileAgent, str], lie: str) -> None:
    config, agent, sid = fake_sandbox
    if lie == "cpus":
        agent.metrics.online_cpus = 1 << 31
    elif lie == "memory":
        agent.metrics.memory.total = (1 << 64) - 1
    elif lie == "load":
        agent.metrics.load.load5 = float("nan")
    elif lie == "interface":  # a label value full of junk
        agent.metrics.interfaces.add(name='eth1"} 1\nfake_metric{a="')
    elif lie == "interfaces":  # a cardinality bomb
        for i in range(65):
            agent.metrics.interfaces.add(name=f"if{i}")
    elif lie == "agent_rss":
        agent.metrics.agent.resident_bytes = 1 << 61
    elif lie == "pids":
        agent.stats.cgroup_stats.pids.current = 1 << 40
    else:
        agent.stats.cgroup_stats.memory.usage = 1 << 62
    scraper = Scraper(config)
    f = await scraper.scrape()
    assert samples(f, "pykata_agent_up") == [({"sandbox_id": sid}, 0.0)]
    assert not any(samples(f, name) for name in f if name.startswith(("pykata_guest_", "pykata_agent_"))
                   and name != "pykata_agent_up")
    assert samples(f, "pykata_monitor_scrape_errors") == [({"sandbox_id": sid, "stage": "agent"}, 1.0)]
    assert samples(f, "pykata_shim_threads")  # the host's own figures stay
    assert samples(f, "pykata_shim_rpc")  # and the owner's
    await scraper.close()


async def test_a_scrape_serves_the_background_collection(fake_sandbox: tuple[Config, FakeHostileAgent, str]) -> None:
    """The agent is asked by the collector's thread, not per scrape; a sandbox that goes away is left out
    of the next scrape at once."""
    config, agent, sid = fake_sandbox
    calls = agent.calls
    collector = Collector(Scraper(config), interval=3600)
    collector.start()
    try:
        first = await asyncio.to_thread(collector.families)  # the first scrape waits for a collection
        assert samples(first, "pykata_agent_up") == [({"sandbox_id": sid}, 1.0)]
        asked = len(calls)
        assert "GetGuestMetrics" in calls
        for _ in range(3):
            f = await asyncio.to_thread(collector.families)
        assert len(calls) == asked  # served from the last collection
        assert samples(f, "pykata_guest_load1") == [({"sandbox_id": sid}, 0.5)]
        [(_, age)] = samples(f, "pykata_monitor_sample_age_seconds")
        assert 0 <= age < 60
        # the HTTP body: the collection's text (rendered once) and the per-scrape series, one exposition
        text = (await asyncio.to_thread(collector.exposition)).decode()
        parsed = [(fam.name, [(x.labels, x.value) for x in fam.samples])
                  for fam in text_string_to_metric_families(text)]
        names = [name for name, _ in parsed]
        assert len(names) == len(set(names)) == len(f)  # every family once (the parser drops _total)
        by_name = dict(parsed)
        assert by_name["pykata_guest_load1"] == [({"sandbox_id": sid}, 0.5)]
        assert by_name["pykata_monitor_scrape_seconds"][0][1] >= 0
        assert len(calls) == asked
        # the record says the sandbox stopped: gone from the next scrape, no collection needed
        record = state.load(config.runtime.runtime_path / "sandboxes" / sid)
        assert record is not None
        record.status = "stopped"
        state.save(config.runtime.runtime_path / "sandboxes" / sid, record)
        f = await asyncio.to_thread(collector.families)
        assert not samples(f, "pykata_agent_up") and samples(f, "pykata_monitor_sandboxes") == [({}, 0.0)]
    finally:
        await asyncio.to_thread(collector.close)


@pytest.mark.parametrize("says", [2, PROTOCOL_VERSION])  # its version, or a version it does not live up to
async def test_an_agent_before_guest_metrics_still_gives_what_it_can(
        fake_sandbox: tuple[Config, FakeHostileAgent, str], says: int) -> None:
    config, agent, sid = fake_sandbox
    agent.old, agent.protocol = True, says
    scraper = Scraper(config)
    for _ in range(2):
        f = await scraper.scrape()
        assert samples(f, "pykata_agent_up") == [({"sandbox_id": sid}, 1.0)]
        assert samples(f, "pykata_guest_memory_total_bytes") == [({"sandbox_id": sid}, float(1 << 30))]
        assert samples(f, "pykata_guest_container_pids")  # StatsContainer is as old as the agent
        assert not samples(f, "pykata_guest_load1") and not samples(f, "pykata_agent_threads")  # no zeros
    # an agent that says it is older is never asked; one that does not is asked once, then remembered
    assert agent.calls.count("GetGuestMetrics") == (0 if says == 2 else 1)
    await scraper.close()
