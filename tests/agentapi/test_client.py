"""The typed agent client against a fake agent (a ttrpc server in this process) whose answers break the
contract: each bad answer is refused with AgentReplyError naming the RPC and the field, never passed on.

The fake stands in for a hostile guest in these error-path unit tests; the real agent is exercised by
tests/agent, tests/sandbox and tests/shim.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.empty_pb2 import Empty

from pykata.agentapi import Agent, AgentCallError, AgentReplyError, AgentVersionError
from pykata.agentapi.errors import GuestTickError
from pykata.errors import NotFound
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, agent_pb2
from pykata.sandbox.process import start_exec
from pykata.ttrpc import CallContext, Code, Server


class FakeHostileAgent:
    """Answers each RPC with whatever `replies` holds for it (a message, or an exception to raise)."""

    def __init__(self) -> None:
        self.replies: dict[str, Any] = {}
        self.requests: dict[str, Any] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, rpc: str) -> Any:
        if rpc not in AGENT_SERVICE.methods and rpc not in HEALTH_SERVICE.methods:
            raise AttributeError(rpc)

        async def answer(req: Any, ctx: CallContext) -> Any:
            self.requests[rpc] = req
            self.calls[rpc] = self.calls.get(rpc, 0) + 1
            reply = self.replies[rpc]
            if callable(reply):  # an answer made at each call
                reply = reply()
            if isinstance(reply, BaseException):
                raise reply
            return reply
        return answer


def _version(protocol: int, agent_version: str = "0.1.0") -> agent_pb2.VersionCheckResponse:
    return agent_pb2.VersionCheckResponse(agent_version=agent_version, protocol_version=protocol)


@pytest.fixture
async def fake_server(tmp_path: Path) -> AsyncIterator[tuple[FakeHostileAgent, Path]]:
    """A fake agent serving (Check) and answering Version with this host's protocol unless told."""
    handler = FakeHostileAgent()
    handler.replies["Check"] = agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)
    handler.replies["Version"] = _version(PROTOCOL_VERSION)
    server = Server(sessions=True)  # as the agent's (protocol 8: it echoes a host's session hello)
    server.register(AGENT_SERVICE, handler)
    server.register(HEALTH_SERVICE, handler)
    await server.serve_unix(str(tmp_path / "agent.sock"))
    try:
        yield handler, tmp_path / "agent.sock"
    finally:
        await server.close()


async def test_connect_refuses_an_agent_that_predates_session_hellos(tmp_path: Path) -> None:
    """A fake agent of protocol 7 (its server knows no hello): refused at once, naming the fix."""
    handler = FakeHostileAgent()
    handler.replies["Check"] = agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)
    handler.replies["Version"] = _version(7)
    server = Server()
    server.register(AGENT_SERVICE, handler)
    server.register(HEALTH_SERVICE, handler)
    await server.serve_unix(str(tmp_path / "agent.sock"))
    try:
        start = time.monotonic()
        with pytest.raises(AgentVersionError, match="pykata image build"):
            await Agent.connect(tmp_path / "agent.sock", "sb1", timeout=20)
        assert time.monotonic() - start < 5
    finally:
        await server.close()


@pytest.fixture
async def fake(fake_server: tuple[FakeHostileAgent, Path]) -> AsyncIterator[tuple[FakeHostileAgent, Agent]]:
    handler, sock = fake_server
    agent = await Agent.connect(sock, "sb1", timeout=5)
    try:
        yield handler, agent
    finally:
        await agent.close()


@pytest.mark.parametrize("attach", [False, True])
async def test_an_agent_older_than_the_host_needs_is_refused_naming_both_versions(
        fake_server: tuple[FakeHostileAgent, Path], attach: bool) -> None:
    # a guest image built from code before ReseedRandomDev/SetPolicy, or a guest that says it is one
    handler, sock = fake_server
    handler.replies["Version"] = _version(MIN_PROTOCOL_VERSION - 1, "0.0.1\nfake log line")
    with pytest.raises(AgentVersionError) as info:
        await (Agent.attach(sock, "sb1") if attach else Agent.connect(sock, "sb1", timeout=5))
    message = str(info.value)
    assert f"protocol {MIN_PROTOCOL_VERSION - 1} " in message and f"at least {MIN_PROTOCOL_VERSION}" in message
    assert f"speaks {PROTOCOL_VERSION}" in message and "sandbox sb1" in message and "pykata image build" in message
    assert "\n" not in message  # the guest's text is quoted, not spliced into logs


@pytest.mark.parametrize("attach", [False, True])
async def test_an_out_of_contract_version_answer_fails_the_connection(
        fake_server: tuple[FakeHostileAgent, Path], attach: bool) -> None:
    handler, sock = fake_server
    handler.replies["Version"] = _version(0)  # proto3's "absent": no agent release answers it
    with pytest.raises(AgentReplyError, match="protocol_version: 0 is not a protocol version"):
        await (Agent.attach(sock, "sb1") if attach else Agent.connect(sock, "sb1", timeout=5))


async def test_a_newer_agent_is_used_at_this_hosts_protocol(fake_server: tuple[FakeHostileAgent, Path]) -> None:
    handler, sock = fake_server
    handler.replies["Version"] = _version(PROTOCOL_VERSION + 40, "9.0")
    agent = await Agent.connect(sock, "sb1", timeout=5)
    try:
        assert (agent.protocol_version, agent.agent_version) == (PROTOCOL_VERSION, "9.0")
    finally:
        await agent.close()


async def test_rpcs_newer_than_an_older_agent_are_not_sent_and_their_fallbacks_hold(
        fake_server: tuple[FakeHostileAgent, Path]) -> None:
    """A fake agent at protocol 2: what came later answers UNIMPLEMENTED on the host (as such an agent
    would), naming both versions, so the callers' fallbacks run; protocol 6's exec stdin is not sent but
    written with WriteStdin as to any old agent."""
    handler, sock = fake_server
    handler.replies["Version"] = _version(2, "0.0.2")
    agent = await Agent.connect(sock, "sb1", timeout=5)
    try:
        assert agent.protocol_version == 2 and agent.supports(2) and not agent.supports(3)
        calls = {
            "GetGuestMetrics": agent.get_guest_metrics,
            "StartDebugConsole": lambda: agent.start_debug_console("dbg"),
            "WarmUp": agent.warm_up,
            "WriteFileFromDisk": lambda: agent.write_file_from_disk(
                "c1", agent_pb2.Process(args=["true"]), "/f", "d", offset=0, length=1, create=True, timeout=5),
            "ReadFileToDisk": lambda: agent.read_file_to_disk(
                "c1", agent_pb2.Process(args=["true"]), "/f", "d", offset=0, length=1, timeout=5),
        }
        for rpc, call in calls.items():
            with pytest.raises(AgentCallError) as info:
                await call()
            assert (info.value.rpc, info.value.code) == (rpc, Code.UNIMPLEMENTED)
            assert "speaks protocol 2 (pykata '0.0.2')" in str(info.value) and "needs" in str(info.value)
        assert not set(calls) & set(handler.requests)

        handler.replies.update(ExecProcess=agent_pb2.ExecProcessResponse(pid=42),
                               WriteStdin=agent_pb2.WriteStreamResponse(length=3), CloseStdin=Empty())
        proc = await start_exec(agent, "c1", "e1", agent_pb2.Process(args=["cat"]), b"abc", close_stdin=True)
        assert proc.pid == 42
        sent = handler.requests["ExecProcess"]
        assert (sent.stdin, sent.close_stdin) == (b"", False)
        assert handler.requests["WriteStdin"].data == b"abc" and "CloseStdin" in handler.requests
    finally:
        await agent.close()


def test_every_agent_rpc_has_a_method() -> None:
    # GetOOMEvent -> get_oom_event, OnlineCPUMem -> online_cpu_mem
    for rpc in (*AGENT_SERVICE.methods, *HEALTH_SERVICE.methods):
        method = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", rpc).lower()
        assert callable(getattr(Agent, method, None)), f"{rpc}: no Agent.{method}"


async def test_good_answers_come_back_typed(fake: tuple[FakeHostileAgent, Agent]) -> None:
    handler, agent = fake
    handler.replies.update(
        ExecProcess=agent_pb2.ExecProcessResponse(pid=42),
        WaitProcess=agent_pb2.WaitProcessResponse(exit_status=137),
        ReadStdout=agent_pb2.ReadStreamResponse(data=b"hi"),
        ReadStderr=agent_pb2.ReadStreamResponse(eof=True),
        WriteStdin=agent_pb2.WriteStreamResponse(length=2),
        GetOOMEvent=agent_pb2.OOMEvent(container_id="c1"),
    )
    assert await agent.exec_process("c1", "e1", agent_pb2.Process(args=["true"])) == 42
    assert handler.requests["ExecProcess"].exec_id == "e1"
    assert await agent.wait_process("c1") == 137
    assert await agent.read_stdout("c1", "", 16) == b"hi"
    assert await agent.read_stderr("c1", "", 16) is None
    assert await agent.write_stdin("c1", "", b"abc") == 2
    assert await agent.get_oom_event() == "c1"


@pytest.mark.parametrize(("rpc", "reply", "field"), [
    ("ExecProcess", agent_pb2.ExecProcessResponse(pid=0), "pid"),
    ("ExecProcess", agent_pb2.ExecProcessResponse(pid=(1 << 22) + 1), "pid"),
    ("CreateContainer", agent_pb2.CreateContainerResponse(pid=0), "pid"),
    ("StartContainer", agent_pb2.StartContainerResponse(pid=0), "pid"),
    ("WaitProcess", agent_pb2.WaitProcessResponse(exit_status=256), "exit_status"),
    ("WaitProcess", agent_pb2.WaitProcessResponse(exit_status=(1 << 32) - 1), "exit_status"),
    ("ReadStdout", agent_pb2.ReadStreamResponse(data=b"x" * 17), "data"),
    ("WriteStdin", agent_pb2.WriteStreamResponse(length=0), "length"),
    ("WriteStdin", agent_pb2.WriteStreamResponse(length=4), "length"),
    ("GetOOMEvent", agent_pb2.OOMEvent(container_id="../../etc"), "container_id"),
    ("GetOOMEvent", agent_pb2.OOMEvent(container_id="c" * 129), "container_id"),
    ("StatsContainer", agent_pb2.StatsContainerResponse(cgroup_stats=agent_pb2.CgroupStats(cgroup_version=7)),
     "cgroup_stats.cgroup_version"),
    ("StatsContainer", agent_pb2.StatsContainerResponse(
        cgroup_stats=agent_pb2.CgroupStats(cpu=agent_pb2.CpuStats(per_cpu_ns=[1] * 5000))),
     "cgroup_stats.cpu.per_cpu_ns"),
    ("ListRoutes", agent_pb2.Routes(routes=[agent_pb2.Route(dest="d" * 100)]), "routes.dest"),
    ("Version", agent_pb2.VersionCheckResponse(agent_version="v" * 100, protocol_version=PROTOCOL_VERSION),
     "agent_version"),
    ("Version", agent_pb2.VersionCheckResponse(agent_version="0.1.0"), "protocol_version"),  # 0: none
    ("Version", agent_pb2.VersionCheckResponse(agent_version="0.1.0", protocol_version=1 << 20),
     "protocol_version"),
])
async def test_out_of_contract_answers_are_refused(fake: tuple[FakeHostileAgent, Agent], rpc: str, reply: Any,
                                                   field: str) -> None:
    handler, agent = fake
    handler.replies[rpc] = reply
    calls = {
        "ExecProcess": lambda: agent.exec_process("c1", "e1", agent_pb2.Process(args=["true"])),
        "CreateContainer": lambda: agent.create_container("c1", "{}"),
        "StartContainer": lambda: agent.start_container("c1"),
        "WaitProcess": lambda: agent.wait_process("c1"),
        "ReadStdout": lambda: agent.read_stdout("c1", "", 16),
        "WriteStdin": lambda: agent.write_stdin("c1", "", b"abc"),
        "GetOOMEvent": agent.get_oom_event,
        "StatsContainer": lambda: agent.stats_container("c1"),
        "ListRoutes": agent.list_routes,
        "Version": agent.version,
    }
    with pytest.raises(AgentReplyError) as info:
        await calls[rpc]()
    e = info.value
    assert (e.rpc, e.field, e.code, e.sandbox_id) == (rpc, field, Code.DATA_LOSS, "sb1")
    assert f"agent {rpc}" in str(e) and field in str(e)


async def test_a_failed_call_keeps_its_code_and_names_the_rpc(fake: tuple[FakeHostileAgent, Agent]) -> None:
    handler, agent = fake
    handler.replies["PauseContainer"] = NotFound("no container c9")
    with pytest.raises(AgentCallError) as info:
        await agent.pause_container("c9")
    assert not isinstance(info.value, AgentReplyError)
    assert (info.value.rpc, info.value.code) == ("PauseContainer", Code.NOT_FOUND)
    assert "no container c9" in str(info.value)


async def test_exec_with_stdin_and_wait_with_output(fake: tuple[FakeHostileAgent, Agent]) -> None:
    handler, agent = fake
    handler.replies.update(
        ExecProcess=agent_pb2.ExecProcessResponse(pid=42, stdin_written=3, stdin_closed=True),
        WaitProcess=agent_pb2.WaitProcessResponse(exit_status=1, output=True, stdout=b"out", stdout_eof=True,
                                                  stderr_eof=False))
    started = await agent.exec_process_with_stdin("c1", "e1", agent_pb2.Process(args=["cat"]), b"abc",
                                                  close_stdin=True)
    assert (started.pid, started.stdin_written, started.stdin_closed) == (42, 3, True)
    req = handler.requests["ExecProcess"]
    assert (req.stdin, req.close_stdin) == (b"abc", True)
    exited = await agent.wait_process_output("c1", "e1", 16)
    assert (exited.status, exited.stdout, exited.stderr, exited.stdout_eof, exited.stderr_eof, exited.running) == \
        (1, b"out", b"", True, False, False)
    assert handler.requests["WaitProcess"].output_limit == 16
    # an agent that knows nothing of these fields: the caller is told, and does the rest itself
    handler.replies["WaitProcess"] = agent_pb2.WaitProcessResponse(exit_status=0)
    assert (await agent.wait_process_output("c1", "e1", 16)).stdout is None


async def test_wait_with_output_bounded_in_time(fake: tuple[FakeHostileAgent, Agent],
                                                fake_server: tuple[FakeHostileAgent, Path]) -> None:  # one handler
    """within_ms goes out as output_wait_ms; a process still running when it passed may come back
    with no output (only then); an agent before protocol 7 is not asked at all."""
    handler, agent = fake
    handler.replies["WaitProcess"] = agent_pb2.WaitProcessResponse(output=True, running=True)
    exited = await agent.wait_process_output("c1", "e1", 16, within_ms=250)
    assert (exited.running, exited.stdout, exited.stderr) == (True, b"", b"")
    assert (handler.requests["WaitProcess"].output_limit, handler.requests["WaitProcess"].output_wait_ms) == (16, 250)
    with pytest.raises(AgentReplyError) as info:  # not bounded: running without output is out of contract
        await agent.wait_process_output("c1", "e1", 16)
    assert info.value.field == "running"
    _, sock = fake_server
    handler.requests.pop("WaitProcess")
    handler.replies["Version"] = _version(6, "0.0.6")
    agent6 = await Agent.connect(sock, "sb1", timeout=5)
    try:
        with pytest.raises(AgentCallError) as called:
            await agent6.wait_process_output("c1", "e1", 16, within_ms=250)
        assert called.value.code == Code.UNIMPLEMENTED and "needs 7" in str(called.value)
        assert "WaitProcess" not in handler.requests
    finally:
        await agent6.close()


@pytest.mark.parametrize(("rpc", "reply", "field"), [
    ("ExecProcess", agent_pb2.ExecProcessResponse(pid=7, stdin_written=4), "stdin_written"),
    ("ExecProcess", agent_pb2.ExecProcessResponse(pid=7, stdin_written=2, stdin_closed=True), "stdin_closed"),
    ("WaitProcess", agent_pb2.WaitProcessResponse(output=True, stdout=b"x" * 17), "stdout"),
    ("WaitProcess", agent_pb2.WaitProcessResponse(output=True, stderr=b"x" * 17), "stderr"),
    ("WaitProcess", agent_pb2.WaitProcessResponse(stdout=b"x"), "output"),
    ("WaitProcess", agent_pb2.WaitProcessResponse(output=True, running=True), "running"),
    ("WaitProcess", agent_pb2.WaitProcessResponse(output=True, running=True, exit_status=3, stdout=b"x"), "running"),
])
async def test_out_of_contract_stdin_and_output_are_refused(fake: tuple[FakeHostileAgent, Agent], rpc: str,
                                                            reply: Any, field: str) -> None:
    handler, agent = fake
    handler.replies[rpc] = reply
    with pytest.raises(AgentReplyError) as info:
        if rpc == "ExecProcess":
            await agent.exec_process_with_stdin("c1", "e1", agent_pb2.Process(args=["cat"]), b"abc")
        else:
            await agent.wait_process_output("c1", "e1", 16)
    assert (info.value.rpc, info.value.field) == (rpc, field)


SERVING = agent_pb2.HealthCheckResponse.SERVING


def _clocks(tick_clock_ns: Callable[[int], int]) -> Callable[[], agent_pb2.HealthCheckResponse]:
    """Check answers with this host's monotonic clock as the guest's, and `tick_clock_ns(clock_ns)` as
    its coarse clock (the clock of its last timer tick)."""
    def answer() -> agent_pb2.HealthCheckResponse:
        now = time.monotonic_ns()
        return agent_pb2.HealthCheckResponse(status=SERVING, clock_ns=now, tick_clock_ns=tick_clock_ns(now))
    return answer


async def test_a_guest_without_a_timer_tick_is_refused_when_it_connects(
        fake_server: tuple[FakeHostileAgent, Path]) -> None:
    """The guest of a stalled APIC timer calibration ("APIC frequency too slow") answers RPCs, but its
    coarse clock stands where its last tick left it while its monotonic clock goes on: its sleeps
    would never end. The host refuses it, naming what is wrong, instead of handing it a workload."""
    handler, sock = fake_server
    handler.replies["Check"] = _clocks(lambda now: 340_000_000)
    with pytest.raises(GuestTickError) as info:
        await Agent.connect(sock, "sb1", timeout=5)
    message = str(info.value)
    assert "sandbox sb1: the guest has no timer tick" in message and "stood still at 0.34 s" in message
    assert "\n" not in message and handler.calls["Check"] == 2


async def test_a_starved_guest_whose_tick_catches_up_is_not_refused(
        fake_server: tuple[FakeHostileAgent, Path]) -> None:
    """A guest the busy host did not run for a while lags at first, then its next tick catches up."""
    handler, sock = fake_server
    first = time.monotonic_ns()
    handler.replies["Check"] = _clocks(lambda now: first - 2_000_000_000 if handler.calls["Check"] == 1 else now)
    agent = await Agent.connect(sock, "sb1", timeout=5)
    await agent.close()
    assert handler.calls["Check"] == 2


async def test_a_healthy_guest_costs_one_check(fake_server: tuple[FakeHostileAgent, Path]) -> None:
    handler, sock = fake_server
    handler.replies["Check"] = _clocks(lambda now: now - 3_000_000)  # its last tick 3 ms ago
    agent = await Agent.connect(sock, "sb1", timeout=5)
    await agent.close()
    handler.replies["Check"] = agent_pb2.HealthCheckResponse(status=SERVING)  # an agent without the clocks
    agent = await Agent.connect(sock, "sb1", timeout=5)
    await agent.close()
    assert handler.calls["Check"] == 2


async def test_a_tick_clock_ahead_of_the_monotonic_one_is_out_of_contract(
        fake_server: tuple[FakeHostileAgent, Path]) -> None:
    handler, sock = fake_server
    handler.replies["Check"] = agent_pb2.HealthCheckResponse(status=SERVING, clock_ns=5, tick_clock_ns=1 << 62)
    with pytest.raises(AgentReplyError, match="tick_clock_ns"):
        await Agent.connect(sock, "sb1", timeout=5)


def test_guest_text_bounds_and_escapes_the_agent_error_message() -> None:
    from pykata.agentapi.errors import MAX_GUEST_TEXT, AgentCallError, guest_text

    assert guest_text("crun: exec: no such file") == "crun: exec: no such file"
    assert guest_text("a\nb\rc\x1b[2J\u202ed") == "a\\nb\\rc\\x1b[2J\\u202ed"
    long = guest_text("x" * (MAX_GUEST_TEXT + 10))
    assert long == "x" * MAX_GUEST_TEXT + "... (10 more characters)"
    assert len(guest_text("\n" * (4 << 20))) <= MAX_GUEST_TEXT + 40
    e = AgentCallError("sb", "ExecProcess", Code.INTERNAL, "bad\nline")
    assert e.message == "bad\\nline" and "\n" not in str(e)


def test_guest_tail_keeps_the_end_bounded_and_escaped(tmp_path: Path) -> None:
    """What log_tail quotes of the guest's console in a boot's error (guest not ready, QEMU exited)."""
    from pykata.errors import guest_tail
    from pykata.hypervisor.readiness import log_tail

    assert guest_tail("line 1\r\nline 2") == "line 1\\nline 2"
    assert guest_tail("ok\rforged\x1b[2J\u202e") == "ok\\rforged\\x1b[2J\\u202e"
    assert guest_tail("a" * 100 + "END", 10) == "...aaaaaaaEND"
    assert len(guest_tail("\x1b" * 5000, 3000)) <= 3003  # escaping does not lift the bound
    log = tmp_path / "console.log"
    log.write_bytes(b"\x1b[2J" * 2000 + b"\r\ntime=\"x\" level=info msg=forged\r\nlast line\r\n")
    text = log_tail(log)
    assert len(text) <= 3003 and text.endswith("forged\\nlast line")
    assert "\x1b" not in text and "\r" not in text and "\n" not in text
