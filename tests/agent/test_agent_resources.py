"""Cgroup limits, stats, OOM events, pause/resume and update, through the agent with real crun."""

from __future__ import annotations

import asyncio
import json

from pykata.protocols.agent import agent_pb2
from pykata.ttrpc import Code, RpcError
from tests.agent.conftest import AgentHelper, cgroup_file, cgroup_version

MiB = 1 << 20


async def _next_oom_event_for(agent: AgentHelper, cid: str) -> bool:
    """Wait for an OOM event naming `cid` (events of other tests' containers may come first)."""
    async with asyncio.timeout(30):
        while (await agent.stub.GetOOMEvent(agent_pb2.GetOOMEventRequest())).container_id != cid:
            pass
    return True


def _memory_limit_file(agent: AgentHelper, cid: str) -> int:
    path = cgroup_file(agent.env.cgroup_parent, cid, ("memory", "memory.limit_in_bytes"), "memory.max")
    return int(path.read_text())


async def test_memory_limit_from_the_spec_is_set_and_enforced(agent: AgentHelper) -> None:
    limit = 24 * MiB
    spec = agent.spec(["sleep", "1000"], resources={"memory": {"limit": limit, "swap": limit}})
    await agent.create("memlimit", spec)
    await agent.start("memlimit")
    await agent.close_stdin("memlimit")
    assert _memory_limit_file(agent, "memlimit") == limit
    stats = await agent.stub.StatsContainer(agent_pb2.StatsContainerRequest(container_id="memlimit"))
    assert stats.cgroup_stats.memory.limit == limit
    # 8 MiB fit, 64 MiB do not: dd allocates its block and fills it
    await agent.exec("memlimit", "small", ["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"])
    assert (await agent.collect("memlimit", "small"))[0] == 0
    await agent.exec("memlimit", "big", ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    assert (await agent.collect("memlimit", "big"))[0] == 137
    assert await _next_oom_event_for(agent, "memlimit")


async def test_oom_kill_of_init_raises_an_oom_event(agent: AgentHelper) -> None:
    limit = 16 * MiB
    spec = agent.spec(["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                      resources={"memory": {"limit": limit, "swap": limit}})
    event = asyncio.ensure_future(_next_oom_event_for(agent, "oomer"))
    code, _, _ = await agent.run("oomer", spec=spec)
    assert code == 137
    assert await event
    stats = await agent.stub.StatsContainer(agent_pb2.StatsContainerRequest(container_id="oomer"))
    assert stats.cgroup_stats.memory.oom_kill >= 1


async def test_stats_report_cpu_memory_and_pids(agent: AgentHelper) -> None:
    await agent.create("busy", args=["sh", "-c", "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; "
                                     "echo done; sleep 1000"])
    await agent.start("busy")
    await agent.close_stdin("busy")
    first = await agent.stub.ReadStdout(agent_pb2.ReadStreamRequest(container_id="busy", max_length=16))
    assert first.data == b"done\n"
    resp = await agent.stub.StatsContainer(agent_pb2.StatsContainerRequest(container_id="busy"))
    s = resp.cgroup_stats
    assert s.cgroup_version == cgroup_version()
    assert s.cpu.usage_total_ns > 10_000_000  # the loop above takes tens of milliseconds at least
    assert s.memory.usage > 0
    assert s.pids.current >= 1
    assert s.memory.stat  # the raw memory.stat keys came along


async def test_pause_freezes_and_resume_thaws(agent: AgentHelper) -> None:
    await agent.create("frozen", args=["sh", "-c", "while true; do echo tick; sleep 0.05; done"])
    await agent.start("frozen")
    await agent.close_stdin("frozen")
    await agent.stub.PauseContainer(agent_pb2.PauseContainerRequest(container_id="frozen"))
    state = cgroup_file(agent.env.cgroup_parent, "frozen", ("freezer", "freezer.state"), "cgroup.freeze")
    assert state.read_text().strip() in ("FROZEN", "1")
    # drain what was printed before the freeze, then nothing more may come
    while True:
        try:
            async with asyncio.timeout(0.3):
                await agent.stub.ReadStdout(agent_pb2.ReadStreamRequest(container_id="frozen"))
        except TimeoutError:
            break
    with_timeout = asyncio.ensure_future(agent.stub.ReadStdout(agent_pb2.ReadStreamRequest(container_id="frozen")))
    await asyncio.sleep(0.5)
    assert not with_timeout.done(), "a paused container printed"
    for call, req in ((agent.stub.ExecProcess, agent_pb2.ExecProcessRequest(
            container_id="frozen", exec_id="x", process=agent_pb2.Process(args=["true"]))),
                      (agent.stub.PauseContainer, agent_pb2.PauseContainerRequest(container_id="frozen"))):
        try:
            await call(req)
            raise AssertionError("expected FAILED_PRECONDITION")
        except RpcError as exc:
            assert exc.code == Code.FAILED_PRECONDITION
    await agent.stub.ResumeContainer(agent_pb2.ResumeContainerRequest(container_id="frozen"))
    assert state.read_text().strip() in ("THAWED", "0")
    assert (await asyncio.wait_for(with_timeout, 5)).data.startswith(b"tick")


async def test_update_changes_the_memory_limit(agent: AgentHelper) -> None:
    await agent.create("upd", agent.spec(["sleep", "1000"], resources={"memory": {"limit": 64 * MiB}}))
    await agent.start("upd")
    await agent.close_stdin("upd")
    await agent.stub.UpdateContainer(agent_pb2.UpdateContainerRequest(
        container_id="upd", linux_resources_json=json.dumps({"memory": {"limit": 48 * MiB}})))
    assert _memory_limit_file(agent, "upd") == 48 * MiB
    try:
        await agent.stub.UpdateContainer(agent_pb2.UpdateContainerRequest(
            container_id="upd", linux_resources_json="[1, 2]"))
        raise AssertionError("expected INVALID_ARGUMENT")
    except RpcError as exc:
        assert exc.code == Code.INVALID_ARGUMENT and "linux_resources_json" in exc.message
