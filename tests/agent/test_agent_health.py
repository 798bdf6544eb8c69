"""The placeholder agent on the host: Health over a raw pty, which behaves like a virtio-serial port
(a character device the agent opens by path; the host end is a byte stream)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tty
from pathlib import Path

import pytest

import pykata
from pykata.agent.channel import Channel, ChannelError, parse_channel
from pykata.agent.main import READY_LINE, run
from pykata.agent.ports import find_serial_port
from pykata.protocols.agent import HEALTH_SERVICE, PROTOCOL_VERSION, agent_pb2
from pykata.ttrpc import connect_fd


@pytest.fixture
def raw_pty() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no CR/LF translation: a clean byte pipe like a virtio port
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


async def test_health_check_and_version_over_a_character_device(raw_pty: tuple[int, str]) -> None:
    master, device = raw_pty
    agent = asyncio.ensure_future(run(device))
    try:
        client = await connect_fd(master, default_timeout=5)
        health = client.stub(HEALTH_SERVICE)
        check = await health.Check(agent_pb2.CheckRequest())
        assert check.status == agent_pb2.HealthCheckResponse.SERVING
        version = await health.Version(agent_pb2.CheckRequest())
        assert version.agent_version == pykata.__version__
        assert version.protocol_version == PROTOCOL_VERSION
        await client.close()
    finally:
        agent.cancel()
        with pytest.raises(asyncio.CancelledError):
            await agent


async def test_agent_prints_ready_line(raw_pty: tuple[int, str], capsys: pytest.CaptureFixture[str]) -> None:
    _master, device = raw_pty
    agent = asyncio.ensure_future(run(device))
    try:
        for _ in range(100):
            if READY_LINE in capsys.readouterr().out:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("agent never printed its ready line")
    finally:
        agent.cancel()
        with pytest.raises(asyncio.CancelledError):
            await agent


async def test_missing_device_is_a_channel_error(tmp_path: Path) -> None:
    with pytest.raises(ChannelError, match="cannot open agent channel"):
        await run(str(tmp_path / "no-such-port"))


def test_parse_channel() -> None:
    assert parse_channel("vsock:1024") == Channel("vsock", port=1024)
    assert parse_channel("vsock:") == Channel("vsock", port=1024)
    assert parse_channel("/dev/vport1p1") == Channel("serial", device="/dev/vport1p1")
    for bad in ("vsock:x", "vsock:0", "tcp:1", "relative/path"):
        with pytest.raises(ChannelError, match="--channel"):
            parse_channel(bad)


def test_find_serial_port_by_name(tmp_path: Path) -> None:
    for port, name in (("vport0p1", "other"), ("vport0p2", "agent.channel.0")):
        (tmp_path / port).mkdir()
        (tmp_path / port / "name").write_text(name + "\n")
    assert find_serial_port("agent.channel.0", tmp_path) == "/dev/vport0p2"
    assert find_serial_port("missing", tmp_path) is None


def test_agent_imports_only_what_the_guest_has() -> None:
    """The guest carries the stdlib, protobuf and pykata's ttrpc/protocols/agent: nothing else."""
    code = (
        "import sys; before = set(sys.modules); import pykata.agent.main; "
        "mods = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(' '.join(sorted(mods - set(sys.stdlib_module_names))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found = set(proc.stdout.split())
    assert "pykata" in found
    assert found <= {"pykata", "google"}, found


def _run_as_guest_starts(code: str) -> str:
    """Run `code` in a fresh interpreter after the agent's start-up deferrals (as the guest's init runs
    it, with `sys` imported); return its stdout, failing with its stderr."""
    prelude = "import sys; from pykata.agent.boot import defer_imports; defer_imports(); "
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_agent_start_up_leaves_out_modules_only_rare_paths_need() -> None:
    """Importing the agent as the guest does and reading the init's arguments loads neither dataclasses (pykata.record
    instead), argparse (only for other command lines) nor pickle (only the exec spawner)."""
    out = _run_as_guest_starts(
        "import pykata.agent.main as m; "
        "args = m.parse_args(['--channel', 'vsock:1024', '--debug', '--exec-with', 'crun']); "
        "print(args.channel, args.debug, args.exec_with, "
        "*[n for n in ('dataclasses', 'argparse', 'gettext', 'pickle') if n in sys.modules])"
    )
    assert out.split() == ["vsock:1024", "True", "crun"], out


def test_agent_start_up_defers_protobufs_python_runtime_and_messages_still_work() -> None:
    """pykata.agent.boot: protobuf's pure-Python message runtime (and text_format, decoder, ...
    which it imports) is not loaded by importing the agent, yet messages encode, decode and print,
    and the module loads when something touches it."""
    out = _run_as_guest_starts(
        "import pykata.agent.main; from pykata.protocols.agent import agent_pb2; "
        "loaded = [m for m in ('google.protobuf.text_format', 'google.protobuf.internal.decoder') "
        "if m in sys.modules]; "
        "req = agent_pb2.CheckRequest(service='x'); "
        "assert agent_pb2.CheckRequest.FromString(req.SerializeToString()).service == 'x'; "
        "assert 'x' in str(req); "
        "from google.protobuf.internal import python_message; python_message._AttachFieldHelpers; "
        "print('loaded:', *loaded, 'text_format' in sys.modules['google.protobuf.text_format'].__name__)"
    )
    assert out.split() == ["loaded:", "True"], out


def test_agent_start_up_leaves_the_pod_handlers_for_after_the_ready_line() -> None:
    """Importing the agent as the guest does loads none of LateAgent's modules (the AgentService and
    its container, storage and network handlers): the VM's agent imports them after its ready line."""
    out = _run_as_guest_starts(
        "import pykata.agent.main as m; print(*[n for n in m.LATE_MODULES if n in sys.modules])"
    )
    assert out.split() == [], out


class _FakeAgentService:
    """A fake AgentService: answers GetGuestDetails with a constant and records its close."""

    closed = False

    async def GetGuestDetails(self, req: agent_pb2.GuestDetailsRequest, ctx: object) -> agent_pb2.GuestDetailsResponse:
        return agent_pb2.GuestDetailsResponse(kernel_release="fake")

    def SetGuestDateTime(self, req: agent_pb2.SetGuestDateTimeRequest, ctx: object) -> str:
        return f"set {req.sec}"

    async def close(self) -> None:
        self.closed = True


async def test_a_call_before_the_late_agent_loaded_waits_for_it() -> None:
    """LateAgent: a call of an AgentService RPC made while the load runs waits for it and is then
    answered by the loaded service; a name that is no RPC is an AttributeError; close() closes it."""
    from pykata.agent.main import LateAgent

    release = asyncio.Event()
    fake = _FakeAgentService()

    async def slow_load() -> _FakeAgentService:
        await release.wait()
        return fake

    late = LateAgent()
    late._load = slow_load  # type: ignore[method-assign,assignment]
    call = asyncio.ensure_future(late.GetGuestDetails(agent_pb2.GuestDetailsRequest(), None))
    await asyncio.sleep(0.05)
    assert not call.done()
    release.set()
    assert (await asyncio.wait_for(call, 5)).kernel_release == "fake"
    with pytest.raises(AttributeError):
        late.NoSuchRpc  # noqa: B018
    await late.close()
    assert fake.closed


async def test_immediate_rpcs_are_plain_functions_once_loaded() -> None:
    """LateAgent's IMMEDIATE_RPCS (plain-function handlers, which the server answers with no task) hand
    back an awaitable until the service is loaded, the answer itself after; PolicyGate keeps them plain
    and checks them as they are called."""
    from pykata.agent.main import IMMEDIATE_RPCS, LateAgent
    from pykata.agent.policy import PolicyGate
    from pykata.errors import PermissionDenied

    assert "SetGuestDateTime" in IMMEDIATE_RPCS
    release = asyncio.Event()

    async def slow_load() -> _FakeAgentService:
        await release.wait()
        return _FakeAgentService()

    late = LateAgent()
    late._load = slow_load  # type: ignore[method-assign,assignment]
    gate = PolicyGate(late)
    set_time = gate.SetGuestDateTime
    assert not asyncio.iscoroutinefunction(set_time) and asyncio.iscoroutinefunction(gate.GetGuestDetails)
    pending = set_time(agent_pb2.SetGuestDateTimeRequest(sec=1), None)
    assert asyncio.iscoroutine(pending)
    release.set()
    assert await asyncio.wait_for(pending, 5) == "set 1"
    assert set_time(agent_pb2.SetGuestDateTimeRequest(sec=2), None) == "set 2"  # loaded: the answer itself
    gate.SetPolicy(agent_pb2.SetPolicyRequest(policy_json='{"version": 1, "allow_rpcs": ["CreateSandbox"]}'), None)
    with pytest.raises(PermissionDenied):
        set_time(agent_pb2.SetGuestDateTimeRequest(sec=3), None)
    await late.close()


def test_start_up_defers_tracebacks_helpers_until_used_or_loaded() -> None:
    """pykata.agent.boot: tokenize and textwrap wait for their first use through the agent's imports and a
    later `import tokenize` (Python 3.11 reads the module's __spec__ there); formatting a traceback loads
    what it needs, with source lines; load_deferred (LateAgent, after the ready line) loads the rest."""
    out = _run_as_guest_starts(
        "import types; import pykata.agent.pid1, pykata.agent.main; import tokenize; "
        "loaded = lambda: [n for n in ('tokenize', 'textwrap') if type(sys.modules.get(n)) is types.ModuleType]; "
        "print('before:', *loaded()); "
        "import json, traceback\n"
        "try:\n    json.loads('{')\nexcept ValueError:\n    assert 'self.scan_once(' in traceback.format_exc()\n"
        "print('used:', *loaded()); "
        "from pykata.agent.boot import LATE_STDLIB, load_deferred\n"
        "for n in LATE_STDLIB:\n    load_deferred(n)\n"
        "from textwrap import indent; print('after:', *loaded(), indent('a', '> '))"
    )
    assert out.splitlines() == ["before:", "used: tokenize textwrap", "after: tokenize textwrap > a"], out
