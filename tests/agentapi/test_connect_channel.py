"""Agent.connect on a virtio-serial channel whose guest reads slowly, drops a session or holds half a
frame: the connection is not given up while the guest is still reading it, a reconnect's flush is as
small as what it must complete, and a guest that never reads fails with an error that says so.

`FakeChardevPort` stands in for QEMU's chardev socket in front of a virtio-serial port (error-path unit
tests; the real port and agent are in tests/agent/test_agent_vm.py): one host at a time, read from the
socket only at the guest's pace (QEMU reads only what the guest's port has room for: `stall` stops
reading for a while once per host, as a guest whose vCPU a loaded host does not run), and one byte
stream to the guest for all hosts (what a host did not get read is gone when it leaves, as in QEMU).
The guest end is the real ttrpc Server, as the agent serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pykata.agentapi import Agent
from pykata.agentapi import client as agentclient
from pykata.errors import AgentError
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE, PROTOCOL_VERSION, agent_pb2
from pykata.ttrpc import Server, connect_unix
from pykata.ttrpc.frames import HEADER_SIZE
from pykata.ttrpc.session import FLUSH_BYTE, FLUSH_SIZE, SMALL_FLUSH_SIZE
from tests.agentapi.test_client import FakeHostileAgent, _version


class FakeChardevPort:
    """See the module docstring. `stall`: (after how many bytes of each host, for how many seconds)
    the guest stops reading; `deaf`: connections (by number, from 1) whose bytes the guest reads and
    throws away (a guest whose agent does not serve yet); `reading`: False makes the guest read
    nothing (an agent that never opened its port)."""

    CHUNK = 16 << 10

    def __init__(self, path: Path, *, stall: tuple[int, float] = (0, 0.0), deaf: frozenset[int] = frozenset(),
                 reading: bool = True) -> None:
        self.path = path
        self.stall = stall
        self.deaf = deaf
        self.reading = reading
        self.guest, self._guest = socket.socketpair()
        self._guest.setblocking(False)
        self.connections: list[bytearray] = []  # what the guest read of each host

    async def start(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(self.path))
        self._listener.listen(8)
        self._listener.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # QEMU's chardev serves one host at a time; the next waits in the backlog
            host, _ = await loop.sock_accept(self._listener)
            host.setblocking(False)
            with host:
                await self._serve(host)

    async def _serve(self, host: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        seen = bytearray()
        self.connections.append(seen)
        n = len(self.connections)
        down = asyncio.ensure_future(self._down(host))
        try:
            if not self.reading:
                await asyncio.Event().wait()  # the bytes stay in the socket, unread
            # read only as much as the guest takes (QEMU: what its port has room for), never ahead
            gone = select.poll()
            gone.register(host, select.POLLRDHUP)
            while not gone.poll(0) and (data := await loop.sock_recv(host, self.CHUNK)):
                if len(seen) < self.stall[0] <= len(seen) + len(data):
                    await asyncio.sleep(self.stall[1])
                seen += data
                if n not in self.deaf:
                    await loop.sock_sendall(self._guest, data)
        except ConnectionError:
            pass
        # a host that left: what it wrote and the guest did not read is gone (QEMU's chardev drops it)
        finally:
            down.cancel()
            await asyncio.gather(down, return_exceptions=True)  # a cancel of this task still ends it

    async def _down(self, host: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(self._guest, 1 << 16):
            await loop.sock_sendall(host, data)

    async def close(self) -> None:
        self._accepting.cancel()
        await asyncio.gather(self._accepting, return_exceptions=True)
        self._listener.close()
        self._guest.close()
        self.guest.close()


@contextlib.asynccontextmanager
async def fake_agent_port(tmp_path: Path, **kw: Any) -> AsyncIterator[FakeChardevPort]:
    handler = FakeHostileAgent()
    handler.replies["Check"] = agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)
    handler.replies["Version"] = _version(PROTOCOL_VERSION)
    server = Server(sessions=True)
    server.register(AGENT_SERVICE, handler)
    server.register(HEALTH_SERVICE, handler)
    port = FakeChardevPort(tmp_path / "agent.sock", **kw)
    serving = asyncio.ensure_future(server.serve_fd(port.guest.fileno(), resync=True, sessions=True))
    await port.start()
    try:
        yield port
    finally:
        await server.close()
        await port.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 5)


def _leading_flush(seen: bytes) -> int:
    return len(seen) - len(seen.lstrip(bytes([FLUSH_BYTE])))


@pytest.fixture
def short_silence(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(agentclient, "RECONNECT_SILENCE", 0.4)
    return 0.4


async def test_a_guest_still_reading_a_flush_is_not_given_up_on(tmp_path: Path, short_silence: float) -> None:
    """The failure under load: a 4 MiB flush took the guest longer than RECONNECT_SILENCE to read, so
    Agent.connect gave each connection up before its hello came and wrote another flush, until the
    boot's deadline. Here the guest stops reading for 2 s (five silences) near the end of the flush:
    one connection, answered (before: a new connection and a new flush each time, never answered)."""
    async with fake_agent_port(tmp_path, stall=(FLUSH_SIZE - (64 << 10), 2.0)) as port:
        started = time.monotonic()
        agent = await Agent.connect(port.path, "sb1", timeout=20, flush=True)
        await agent.close()
        assert len(port.connections) == 1, [len(c) for c in port.connections]
        assert _leading_flush(port.connections[0]) == FLUSH_SIZE
        assert time.monotonic() - started > 2.0  # it did wait the stall out


async def test_a_reconnect_after_a_silent_session_writes_a_small_flush(tmp_path: Path,
                                                                       short_silence: float) -> None:
    """The guest read the first connection and never answered it (an agent not serving yet): the next
    connection's flush completes at most a frame of our own (hello, probes), not 4 MiB."""
    async with fake_agent_port(tmp_path, deaf=frozenset({1})) as port:
        agent = await Agent.connect(port.path, "sb1", timeout=30)
        await agent.close()
        assert len(port.connections) == 2
        assert _leading_flush(port.connections[0]) == 0
        assert _leading_flush(port.connections[1]) == SMALL_FLUSH_SIZE
        biggest = max(len(c) for c in port.connections[:1])
        assert biggest < SMALL_FLUSH_SIZE - HEADER_SIZE  # all the first connection wrote fits in it


async def test_half_a_frame_of_4_mib_left_by_another_host_is_completed_by_the_next_flush(
        tmp_path: Path, short_silence: float) -> None:
    """A host before us left a header that announces 4 MiB and a few bytes of it (killed mid-write): a
    small flush cannot complete it, so the connection after that one writes a full flush."""
    async with fake_agent_port(tmp_path) as port:
        with socket.socket(socket.AF_UNIX) as dead:
            dead.connect(str(port.path))
            dead.sendall((4 << 20).to_bytes(4, "big") + b"\x00\x00\x00\x01\x01\x00" + b"x" * 100)
            while not port.connections or len(port.connections[0]) < 110:
                await asyncio.sleep(0.01)
        agent = await Agent.connect(port.path, "sb1", timeout=30)
        await agent.close()
        flushes = [_leading_flush(c) for c in port.connections[1:]]
        assert flushes == [0, SMALL_FLUSH_SIZE, FLUSH_SIZE]


async def test_a_guest_that_never_reads_its_port_fails_naming_it(tmp_path: Path, short_silence: float) -> None:
    async with fake_agent_port(tmp_path, reading=False) as port:
        started = time.monotonic()
        with pytest.raises(AgentError, match="the guest never read its agent port"):
            await Agent.connect(port.path, "sb1", timeout=3)
        assert time.monotonic() - started < 6
        assert len(port.connections) == 1  # nothing read: no reason to reconnect


async def test_unread_by_peer_is_what_the_peer_has_not_read(tmp_path: Path) -> None:
    """A unix socket whose peer reads nothing yet: the hello (and a 64 KiB flush) count; once the peer has
    read every byte, 0."""
    path = tmp_path / "s"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    client = await connect_unix(str(path), session=True, flush=64 << 10)
    peer, _ = listener.accept()
    try:
        assert client.unread_by_peer() > 64 << 10
        peer.setblocking(False)
        got = 0
        deadline = time.monotonic() + 5
        while client.unread_by_peer() and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                got += len(peer.recv(1 << 20))
            await asyncio.sleep(0.01)
        assert client.unread_by_peer() == 0
        assert got > 64 << 10
    finally:
        await client.close()
        peer.close()
        listener.close()
