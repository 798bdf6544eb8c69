"""Host sessions on a byte stream with no connection boundary (pykata.ttrpc.session).

`FakeSerialPort` stands in for QEMU's chardev socket in front of a virtio-serial port whose guest
reader never saw the last host leave: bytes written by the guest while no host is attached wait (as
a guest's writes block while the port's host is away) and go to whichever host attaches next; a host
leaving never ends the guest's stream. The server is the real ttrpc Server, as the agent serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pykata.ttrpc import ConnectionClosedError, RemoteProtocolError, RpcError, Server, connect_fd
from pykata.ttrpc._pb import ttrpc_pb2
from pykata.ttrpc.connection import Connection, HelloReceived, RequestReceived, Role
from pykata.ttrpc.frames import HEADER_SIZE, Flags, FrameType, encode_frame
from pykata.ttrpc.session import (
    FLUSH_SIZE,
    SESSION_STREAM,
    EchoHunter,
    Hunt,
    echo_frame,
    flush_bytes,
    hello_frame,
    new_nonce,
)
from pykata.ttrpc.transport import ConnectionProtocol, FdReader
from tests.ttrpc.conftest import EchoHandler
from tests.ttrpc.echo_pb import ECHO_SERVICE, Echo

_HELLO = len(hello_frame(bytes(16)))


class FakeSerialPort:
    """A fake of QEMU's agent chardev + virtio-serial port (see the module docstring)."""

    def __init__(self) -> None:
        self.guest, self._guest = socket.socketpair()
        self._guest.setblocking(False)
        self._relays: list[asyncio.Task[None]] = []

    async def attach(self) -> socket.socket:
        """A new host connection; the last host's relays stop."""
        await self._stop()
        host, mine = socket.socketpair()
        mine.setblocking(False)
        loop = asyncio.get_running_loop()
        down = loop.create_task(self._copy(self._guest, mine))

        async def up() -> None:
            await self._copy(mine, self._guest)
            down.cancel()  # the host left: the guest's bytes wait for the next host
            mine.close()
        self._relays = [down, loop.create_task(up())]
        return host

    @staticmethod
    async def _copy(src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(src, 1 << 16):
                await loop.sock_sendall(dst, data)

    async def _stop(self) -> None:
        for t in self._relays:
            t.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def close(self) -> None:
        await self._stop()
        self._guest.close()
        self.guest.close()


@contextlib.asynccontextmanager
async def served_port(handler: Any, *, sessions: bool = True,
                      on_first_data: Any = None) -> AsyncIterator[FakeSerialPort]:
    server = Server()
    server.register(ECHO_SERVICE, handler)
    port = FakeSerialPort()
    serving = asyncio.ensure_future(server.serve_fd(port.guest.fileno(), resync=True, sessions=sessions,
                                                    on_first_data=on_first_data))
    try:
        yield port
    finally:
        await server.close()
        await asyncio.wait_for(serving, 5)
        await port.close()


async def _leave_with_calls_in_flight(port: FakeSerialPort, method: str) -> None:
    """Host A: four calls the server is still working on (streams 1, 3, 5, 7), then A goes away."""
    host = await port.attach()
    a = await connect_fd(host.fileno())
    delay = 300 if method == "Echo" else 3000  # Sleep: still running when the next host says hello
    calls = [asyncio.ensure_future(a.call(ECHO_SERVICE, method, Echo(tag=i, delay_ms=delay), timeout=5))
             for i in (1, 2, 3, 4)]
    await asyncio.sleep(0.05)  # written: they reach the server before anything of the next host
    await a.close()
    host.close()
    for r in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(r, ConnectionClosedError)


async def test_without_a_hello_a_new_host_takes_the_old_sessions_answers() -> None:
    """The defect (seen as "server sent a RESPONSE frame on stream 7, which we never opened"): a host
    that reconnects without a hello meets answers of the calls the host before it left in flight."""
    handler = EchoHandler()
    async with served_port(handler) as port:
        await _leave_with_calls_in_flight(port, "Echo")
        host = await port.attach()
        b = await connect_fd(host.fileno())  # no hello: the old behaviour
        try:
            try:
                got = await b.call(ECHO_SERVICE, "Echo", Echo(tag=100), timeout=3)
            except RpcError as e:
                got = e
            # B's call on stream 1 was answered with A's stream-1 answer (or failed): never its own
            assert not (isinstance(got, Echo) and got.tag == 100), got
            await asyncio.sleep(0.5)  # A's later answers (streams 3, 5, 7) break B's connection
            assert b.closed
        finally:
            await b.close()
            host.close()


async def test_a_new_session_gets_only_its_own_answers_after_one_left_calls_in_flight() -> None:
    handler = EchoHandler()
    async with served_port(handler) as port:
        await _leave_with_calls_in_flight(port, "Sleep")
        host = await port.attach()
        b = await connect_fd(host.fileno(), session=True)
        try:
            got = await b.call(ECHO_SERVICE, "Echo", Echo(tag=100), timeout=3)
            assert got.tag == 100
            assert handler.cancelled == 4  # the hello ended A's calls: their answers never come
            assert not b.closed
            many = await asyncio.gather(*(b.call(ECHO_SERVICE, "Echo", Echo(tag=t), timeout=3)
                                          for t in range(200, 210)))
            assert [m.tag for m in many] == list(range(200, 210))
        finally:
            await b.close()
            host.close()


class TagRecorder(EchoHandler):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[int] = []

    async def Echo(self, req: Any, ctx: Any) -> Any:
        self.tags.append(req.tag)
        return await super().Echo(req, ctx)


async def test_a_hello_after_half_a_frame_of_the_last_host_starts_the_session_after_a_flush() -> None:
    """A host killed mid-write leaves half a frame in the port, which takes the next host's hello as its
    data (a hello counts only where a frame begins): that host gets no echo. The one after it writes a
    flush first (Agent.connect does, after a silent connection): it completes the half frame, and the
    agent's parser skips the rest of it to the hello."""
    handler = TagRecorder()
    async with served_port(handler) as port:
        host = await port.attach()
        host.sendall(b"\x00\x00\x10\x00\x00\x00\x00\x01\x01\x00half a request")
        await asyncio.sleep(0.1)  # relayed to the guest before the host goes
        host.close()
        host = await port.attach()
        b = await connect_fd(host.fileno(), session=True)
        try:
            with pytest.raises(RpcError, match="DEADLINE_EXCEEDED"):
                await b.call(ECHO_SERVICE, "Echo", Echo(tag=6), timeout=1)
        finally:
            await b.close()
            host.close()
        host = await port.attach()
        c = await connect_fd(host.fileno(), session=True, flush=FLUSH_SIZE)
        try:
            assert (await c.call(ECHO_SERVICE, "Echo", Echo(tag=7), timeout=10)).tag == 7
            assert 6 not in handler.tags  # the silent host's call went into the half frame
        finally:
            await c.close()
            host.close()


async def test_a_hello_inside_a_frame_is_that_frames_data() -> None:
    """A pod's exec/attach user writes a container's stdin: bytes that spell a hello, and requests
    after it, inside a WriteStdin-like request must reach the handler as they are and must neither end
    the host's session nor be served as a new one's calls."""
    handler = TagRecorder()
    async with served_port(handler) as port:
        host = await port.attach()
        a = await connect_fd(host.fileno(), session=True)
        try:
            forged = encode_frame(1, FrameType.REQUEST, Flags.NONE, ttrpc_pb2.Request(
                service=ECHO_SERVICE.name, method="Echo", payload=Echo(tag=666).SerializeToString()
            ).SerializeToString())
            payload = b"x" + hello_frame(new_nonce()) + forged
            for tag, blob in ((1, payload), (2, hello_frame(new_nonce())), (3, forged)):
                got = await a.call(ECHO_SERVICE, "Echo", Echo(tag=tag, data=blob), timeout=5)
                assert (got.tag, got.data) == (tag, blob)
            assert 666 not in handler.tags and handler.cancelled == 0
            assert not a.closed
        finally:
            await a.close()
            host.close()


async def test_each_host_session_runs_the_first_data_hook_once_before_its_calls() -> None:
    """The agent reseeds the guest's CRNG with each host session's first bytes: a session that begins
    with a hello after another's bytes (no end of stream between them) counts as new."""
    events: list[str] = []

    class Recording(EchoHandler):
        async def Echo(self, req: Any, ctx: Any) -> Any:
            events.append(f"echo {req.tag}")
            return await super().Echo(req, ctx)

    async with served_port(Recording(), on_first_data=lambda: events.append("hook")) as port:
        for tag in (1, 2):
            host = await port.attach()
            client = await connect_fd(host.fileno(), session=True)
            try:
                assert (await client.call(ECHO_SERVICE, "Echo", Echo(tag=tag), timeout=3)).tag == tag
            finally:
                await client.close()
                host.close()
    assert events == ["hook", "echo 1", "hook", "echo 2"]


async def test_an_agent_without_sessions_is_refused_clearly() -> None:
    handler = EchoHandler()
    async with served_port(handler, sessions=False) as port:  # an agent older than protocol 8
        host = await port.attach()
        b = await connect_fd(host.fileno(), session=True)
        try:
            with pytest.raises(ConnectionClosedError, match="predates session hellos"):
                await b.call(ECHO_SERVICE, "Echo", Echo(tag=1), timeout=3)
        finally:
            await b.close()
            host.close()


async def test_a_guest_that_never_echoes_fails_the_connection_after_a_bound() -> None:
    """A hostile guest streaming garbage instead of the echo: the host keeps at most a bounded tail."""
    nonce = new_nonce()
    hunter = EchoHunter(nonce, max_stale=1 << 20)
    state = Hunt.WAITING
    for _ in range(40):
        state, _rest = hunter.feed(b"\x00" * 65536)
        if state is not Hunt.WAITING:
            break
    assert state is Hunt.TOO_MUCH and hunter.dropped > 1 << 20
    assert len(hunter._buf) < 200


def test_the_echo_of_another_session_is_not_ours() -> None:
    mine, theirs = new_nonce(), new_nonce()
    hunter = EchoHunter(mine)
    assert hunter.feed(echo_frame(theirs)) == (Hunt.WAITING, b"")
    assert hunter.feed(echo_frame(mine)[:30]) == (Hunt.WAITING, b"")
    assert hunter.feed(echo_frame(mine)[30:] + b"next") == (Hunt.FOUND, b"next")


@pytest.mark.parametrize("split", [0, 1, 10, 40, _HELLO - 1, _HELLO, _HELLO + 5])
def test_the_agent_finds_a_hello_split_across_reads(split: int) -> None:
    nonce = new_nonce()
    old = encode_frame(1, FrameType.REQUEST, Flags.NONE, ttrpc_pb2.Request(service="s", method="m").SerializeToString())
    new = encode_frame(1, FrameType.REQUEST, Flags.NONE, ttrpc_pb2.Request(service="s", method="n").SerializeToString())
    data = old + hello_frame(nonce) + new
    cut = len(old) + split
    conn = Connection(Role.SERVER, sessions=True)
    events = []
    for chunk in (data[:cut], data[cut:]):
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, HelloReceived):
                conn.new_session()  # stream 1 may be opened again
    assert [type(e).__name__ for e in events] == ["RequestReceived", "HelloReceived", "RequestReceived"]
    assert events[1] == HelloReceived(nonce)
    assert isinstance(events[2], RequestReceived) and events[2].method == "n"


def test_a_hello_on_another_stream_or_with_a_bad_nonce_is_a_plain_request() -> None:
    good = ttrpc_pb2.Request.FromString(hello_frame(bytes(16))[HEADER_SIZE:])
    for sid, method in ((7, good.method), (SESSION_STREAM, good.method[:-1] + "z"),
                        (SESSION_STREAM, good.method[:-2])):
        frame = encode_frame(sid, FrameType.REQUEST, Flags.NONE,
                             ttrpc_pb2.Request(service=good.service, method=method).SerializeToString())
        conn = Connection(Role.SERVER, sessions=True)
        conn.receive_data(frame)
        assert isinstance(conn.next_event(), RequestReceived)


def test_a_flush_is_skipped_in_one_step_and_leaves_the_parser_at_the_hello() -> None:
    nonce = new_nonce()
    conn = Connection(Role.SERVER, sessions=True)
    half = b"\x00\x00\x10\x00\x00\x00\x00\x01\x01\x00half a request"
    conn.receive_data(half + flush_bytes() + hello_frame(nonce))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()  # the half frame, completed by the flush, is no request
    dropped = conn.resync()
    assert conn.next_event() == HelloReceived(nonce)
    assert 0 < dropped <= FLUSH_SIZE


class _Recorder(ConnectionProtocol):
    """What a reader delivers: bytes, and whether it believed an end of file."""

    def __init__(self) -> None:
        super().__init__(Role.SERVER)
        self.got = bytearray()
        self.eof = False

    def data_received(self, data: bytes | memoryview) -> None:
        self.got += data

    def eof_received(self) -> bool | None:
        self.eof = True
        return False


async def test_an_end_of_file_is_believed_only_while_the_peer_stays_away(tmp_path: Any) -> None:
    """A guest reads a new host's first bytes before its kernel knows the host connected, then an end of
    file (the agent took it for the session's end and the echo went with the connection: the 15 s stall).
    A FIFO stands in for the port: its writer leaves (end of file) and another comes. While
    `peer_present` says so the reader reads on; once it says no for EOF_GRACE, the end is believed."""
    import os

    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    present = True
    proto = _Recorder()
    reader = FdReader(os.dup(rfd), proto, peer_present=lambda: present)
    reader.start()
    try:
        first = os.open(fifo, os.O_WRONLY)
        os.write(first, b"hello ")
        os.close(first)  # an end of file, but a host is there (its control message came late)
        await asyncio.sleep(0.1)
        second = os.open(fifo, os.O_WRONLY)
        os.write(second, b"and the rest")
        await asyncio.sleep(0.1)
        assert (bytes(proto.got), proto.eof) == (b"hello and the rest", False)
        present = False
        os.close(second)
        await asyncio.sleep(FdReader.EOF_GRACE + 0.2)
        assert proto.eof
    finally:
        reader.close()
        os.close(rfd)
