"""The asyncio client and server over real unix sockets and descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pykata.ttrpc import (
    MAX_MESSAGE_SIZE,
    Code,
    ConnectionClosedError,
    Flags,
    FrameType,
    RpcError,
    Server,
    connect_fd,
    connect_unix,
    encode_frame,
)
from pykata.ttrpc._pb import ttrpc_pb2
from pykata.ttrpc.server import CallContext
from tests.ttrpc.conftest import EchoHandler
from tests.ttrpc.echo_pb import ECHO_SERVICE, Echo


async def test_unary_call_and_stub(echo_client: Any) -> None:
    resp = await echo_client.call(ECHO_SERVICE, "Echo", Echo(data=b"hi", tag=7), timeout=5)
    assert (resp.data, resp.tag) == (b"hi", 7)
    stub = echo_client.stub(ECHO_SERVICE)
    assert (await stub.Echo(Echo(data=b"x"))).data == b"x"
    with pytest.raises(AttributeError):
        _ = stub.Nope


async def test_thousands_of_concurrent_calls_each_get_their_own_answer(echo_client: Any) -> None:
    """Interleaved answers on a shared connection are the bug class of the seed: every caller must
    get exactly its own response although they complete in random order."""
    rng = random.Random(1234)

    async def one(i: int) -> None:
        data = rng.randbytes(rng.choice([0, 1, 100, 4096, 70_000]))
        resp = await echo_client.call(ECHO_SERVICE, "Echo", Echo(data=data, tag=i, delay_ms=rng.randint(0, 20)))
        assert resp.tag == i and resp.data == data

    await asyncio.gather(*(one(i) for i in range(3000)))


async def test_error_status_names_method(echo_client: Any) -> None:
    with pytest.raises(RpcError) as ei:
        await echo_client.call(ECHO_SERVICE, "Fail", Echo(data=b"thing"))
    assert ei.value.code == Code.NOT_FOUND
    assert ei.value.message == "no thing"
    assert "/pykata.test.EchoService/Fail" in str(ei.value)


async def test_unknown_service_and_method_are_unimplemented(echo_client: Any) -> None:
    for service, method in [("nope.Service", "Echo"), ("pykata.test.EchoService", "Nope")]:
        with pytest.raises(RpcError) as ei:
            await echo_client.call_raw(service, method, b"")
        assert ei.value.code == Code.UNIMPLEMENTED


async def test_bad_payload_is_invalid_argument(echo_client: Any) -> None:
    with pytest.raises(RpcError) as ei:
        await echo_client.call_raw("pykata.test.EchoService", "Echo", b"\xff\xff\xff")
    assert ei.value.code == Code.INVALID_ARGUMENT
    # the connection survives a bad payload
    assert (await echo_client.call(ECHO_SERVICE, "Echo", Echo(tag=1))).tag == 1


async def test_deadline_is_sent_and_enforced_both_sides(echo_server: Any, echo_client: Any) -> None:
    _, handler, _ = echo_server
    resp = await echo_client.call(ECHO_SERVICE, "Sleep", Echo(delay_ms=1), timeout=2.5)
    assert resp.tag == 2500  # the server saw timeout_nano
    with pytest.raises(RpcError) as ei:
        await echo_client.call(ECHO_SERVICE, "Sleep", Echo(delay_ms=5000), timeout=0.2)
    assert ei.value.code == Code.DEADLINE_EXCEEDED
    for _ in range(50):
        if handler.cancelled:
            break
        await asyncio.sleep(0.02)
    assert handler.cancelled == 1  # the server stopped the handler at its deadline too


async def test_server_deadline_answers_deadline_exceeded(echo_client: Any) -> None:
    # the client waits longer than it announces, so the server's own enforcement answers
    payload = Echo(delay_ms=3000).SerializeToString()
    sid, wire = echo_client._p.conn.send_request("pykata.test.EchoService", "Sleep", payload,
                                                  timeout_nano=100_000_000)
    from pykata.ttrpc.client import _Pending
    p = _Pending("x", asyncio.get_running_loop(), False)
    echo_client._p.pending[sid] = p
    echo_client._p.write(wire)
    resp = await asyncio.wait_for(p.response, 2)
    assert resp.code == Code.DEADLINE_EXCEEDED


async def test_cancelled_call_does_not_disturb_the_others(echo_client: Any) -> None:
    slow = asyncio.ensure_future(echo_client.call(ECHO_SERVICE, "Echo", Echo(delay_ms=300, tag=1)))
    await asyncio.sleep(0.05)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert (await echo_client.call(ECHO_SERVICE, "Echo", Echo(tag=2))).tag == 2
    await asyncio.sleep(0.4)  # the late answer to the cancelled call arrives and is dropped
    assert echo_client._p.conn.dropped_frames == 1
    assert (await echo_client.call(ECHO_SERVICE, "Echo", Echo(tag=3))).tag == 3


async def test_connection_drop_fails_every_pending_call_at_once(echo_server: Any) -> None:
    path, _, server = echo_server
    client = await connect_unix(path)
    calls = [asyncio.ensure_future(client.call(ECHO_SERVICE, "Sleep", Echo(delay_ms=10_000)))
             for _ in range(50)]
    await asyncio.sleep(0.1)
    await server.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2)
    assert all(isinstance(r, ConnectionClosedError) for r in results)
    assert all("/pykata.test.EchoService/Sleep" in str(r) for r in results)
    with pytest.raises(ConnectionClosedError):
        await client.call(ECHO_SERVICE, "Echo", Echo())
    await client.close()
    await client.close()  # idempotent


async def test_metadata_reaches_the_handler(echo_server: Any, echo_client: Any) -> None:
    await echo_client.call(ECHO_SERVICE, "Echo", Echo(), metadata={"a": "1", "b": ["2", "3"]})
    assert echo_server[1].seen_metadata[-1] == {"a": ["1"], "b": ["2", "3"]}


async def test_oversize_request_fails_locally_and_connection_lives(echo_client: Any) -> None:
    with pytest.raises(RpcError) as ei:
        await echo_client.call(ECHO_SERVICE, "Echo", Echo(data=bytes(MAX_MESSAGE_SIZE)))
    assert ei.value.code == Code.RESOURCE_EXHAUSTED
    big = bytes(MAX_MESSAGE_SIZE - 100)
    assert len((await echo_client.call(ECHO_SERVICE, "Echo", Echo(data=big))).data) == len(big)


async def test_server_streaming(echo_client: Any) -> None:
    stream = echo_client.stream(ECHO_SERVICE, "Count", Echo(tag=500))
    got = [m.tag async for m in stream]
    assert got == list(range(500))
    assert await stream.response() is None


async def test_client_streaming(echo_client: Any) -> None:
    stream = echo_client.stream(ECHO_SERVICE, "Sum")
    for i in range(100):
        await stream.send(Echo(tag=i))
    await stream.close_send()
    assert (await stream.response()).tag == sum(range(100))


async def test_bidi_streaming(echo_client: Any) -> None:
    stream = echo_client.stream(ECHO_SERVICE, "Chat")
    for i, word in enumerate([b"a", b"bc", b"def"]):
        await stream.send(Echo(data=word, tag=i))
        reply = await stream.recv()
        assert (reply.data, reply.tag) == (word.upper(), i)
    await stream.close_send()
    assert await stream.recv() is None


async def test_a_client_that_does_not_read_gets_back_pressure(echo_server: Any) -> None:
    """Requests for big answers from a peer that does not read them: the server stops reading
    requests instead of queueing handlers and answers without bound, and loses nothing."""
    path, _, server = echo_server
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
    req = Echo(tag=65536).SerializeToString()
    n = 2000
    for i in range(n):
        env = ttrpc_pb2.Request(service="pykata.test.EchoService", method="Fill", payload=req)
        writer.write(encode_frame(2 * i + 1, FrameType.REQUEST, Flags.NONE, env.SerializeToString()))
    sender = asyncio.ensure_future(writer.drain())
    await asyncio.sleep(1.0)
    (conn,) = list(server._connections)
    assert not conn._transport.is_reading()  # paused: its answers are not being read
    assert len(conn.tasks) < 200
    # now read everything: every answer arrives
    got = 0
    while got < n:
        header = await asyncio.wait_for(reader.readexactly(10), 10)
        length = int.from_bytes(header[:4], "big")
        await reader.readexactly(length)
        got += 1
    await sender
    writer.close()


async def _raw_exchange(path: str, wire: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(wire)
    await writer.drain()
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


@pytest.mark.parametrize("garbage", [
    b"\x01\x00\x00\x00" + b"\x00\x00\x00\x01\x01\x00",  # 16 MiB length
    b"\x00\x00\x00\x00\x00\x00\x00\x01\x07\x00",  # unknown type
    b"\x00\x00\x00\x03\x00\x00\x00\x01\x01\x00\xff\xff\xff",  # request envelope not protobuf
    b"\x00\x00\x00\x00\x00\x00\x00\x02\x01\x00",  # even stream id from a client
])
async def test_protocol_error_ends_only_that_connection(echo_server: Any, echo_client: Any,
                                                        garbage: bytes) -> None:
    path = echo_server[0]
    assert await _raw_exchange(path, garbage) == b""  # server closed it, said nothing
    # other connections go on
    assert (await echo_client.call(ECHO_SERVICE, "Echo", Echo(tag=9))).tag == 9


async def test_truncated_frame_then_close(echo_server: Any, echo_client: Any) -> None:
    req = ttrpc_pb2.Request(service="pykata.test.EchoService", method="Echo").SerializeToString()
    assert await _raw_exchange(echo_server[0], encode_frame(1, FrameType.REQUEST, Flags.NONE, req)[:-2]) == b""
    assert (await echo_client.call(ECHO_SERVICE, "Echo", Echo(tag=1))).tag == 1


@contextlib.asynccontextmanager
async def served_socketpair(server: Server, **serve: Any) -> AsyncIterator[socket.socket]:
    """`server.serve_fd(**serve)` on one end of a socket pair; yields the other end (the peer's). On
    exit both ends are closed, then the server, and the serving task must end."""
    a, b = socket.socketpair()
    serving = asyncio.ensure_future(server.serve_fd(a.fileno(), **serve))
    try:
        yield b
    finally:
        a.close()
        b.close()
        await server.close()
        await asyncio.wait_for(serving, 5)


async def test_fd_transport_resynchronises_after_garbage(tmp_path: Path) -> None:
    """A byte stream with no reconnect signal: stale bytes first, then a new peer's frames."""
    server = Server()
    server.register(ECHO_SERVICE, EchoHandler())
    async with served_socketpair(server) as peer:
        peer.sendall(b"\x00\x00\x10\x00stale-half-frame")
        client = await connect_fd(peer.fileno())
        try:
            resp = await client.call(ECHO_SERVICE, "Echo", Echo(data=b"after", tag=5), timeout=5)
            assert (resp.data, resp.tag) == (b"after", 5)
        finally:
            await client.close()


async def test_on_first_data_runs_once_per_connection_before_its_first_request() -> None:
    """The agent reseeds the guest's CRNG here: it must run before any request of a new session is
    handled, once per connection (descriptor and socket servers alike)."""
    events: list[str] = []

    class Recording(EchoHandler):
        async def Echo(self, req: Any, ctx: CallContext) -> Any:
            events.append(f"echo {req.tag}")
            return await super().Echo(req, ctx)

    server = Server()
    server.register(ECHO_SERVICE, Recording())
    path = f"/tmp/pktt-{os.getpid()}.sock"
    async with served_socketpair(server, on_first_data=lambda: events.append("hook fd")) as peer:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        try:
            listener.listen()
            await server.serve_socket(listener, on_first_data=lambda: events.append("hook sock"))
            client = await connect_fd(peer.fileno())
            try:
                assert events == []  # connected, nothing sent yet
                for tag in (1, 2):
                    assert (await client.call(ECHO_SERVICE, "Echo", Echo(tag=tag), timeout=5)).tag == tag
                assert events == ["hook fd", "echo 1", "echo 2"]
                for tag in (3, 4):  # two connections, a hook each
                    other = await connect_unix(path)
                    try:
                        assert (await other.call(ECHO_SERVICE, "Echo", Echo(tag=tag), timeout=5)).tag == tag
                    finally:
                        await other.close()
                assert events[3:] == ["hook sock", "echo 3", "hook sock", "echo 4"]
            finally:
                await client.close()
        finally:
            os.unlink(path)


async def test_fd_transport_over_a_pipe_pair() -> None:
    """Character devices use pipe transports; two pipes stand in for the two directions."""
    server = Server()
    server.register(ECHO_SERVICE, EchoHandler())
    c2s_r, c2s_w = os.pipe()
    s2c_r, s2c_w = os.pipe()
    # server reads c2s and writes s2c: give it one fd per direction via a small wrapper
    from pykata.ttrpc.client import Client, _ClientProtocol
    from pykata.ttrpc.server import _ServerProtocol
    loop = asyncio.get_running_loop()
    sp = _ServerProtocol(server, resync=True)
    await loop.connect_read_pipe(lambda: sp, os.fdopen(c2s_r, "rb", buffering=0))
    sw, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(s2c_w, "wb", buffering=0))
    sp._writer = sw  # type: ignore[assignment]
    cp = _ClientProtocol()
    await loop.connect_read_pipe(lambda: cp, os.fdopen(s2c_r, "rb", buffering=0))
    cw, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(c2s_w, "wb", buffering=0))
    cp._writer = cw  # type: ignore[assignment]
    client = Client(cp)
    results = await asyncio.gather(*(client.call(ECHO_SERVICE, "Echo", Echo(tag=i), timeout=5)
                                     for i in range(200)))
    assert [r.tag for r in results] == list(range(200))
    await client.close()
    sp.abort()
    await server.close()


async def test_close_returns_after_the_socket_is_closed(echo_server: Any) -> None:
    """A one-connection-at-a-time peer (QEMU's chardev) must see the close before close() returns."""
    client = await connect_unix(echo_server[0])
    sock = client._p._transport.get_extra_info("socket")
    await client.close()
    assert sock.fileno() == -1


async def test_server_stream_ended_by_data_without_a_response(tmp_path: Path) -> None:
    """ttrpc 1.2 lets a server end a stream with Data[remote closed] and no Response message."""
    path = str(tmp_path / "raw.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(10)
        sid = int.from_bytes(header[4:8], "big")
        await reader.readexactly(int.from_bytes(header[:4], "big"))
        writer.write(encode_frame(sid, FrameType.DATA, Flags.NONE, Echo(tag=1).SerializeToString()))
        writer.write(encode_frame(sid, FrameType.DATA, Flags.REMOTE_CLOSED, Echo(tag=2).SerializeToString()))
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    srv = await asyncio.start_unix_server(serve, path)
    client = await connect_unix(path)
    try:
        stream = client.stream(ECHO_SERVICE, "Count", Echo(tag=2), timeout=5)
        assert [m.tag async for m in stream] == [1, 2]
        assert await stream.response() is None
    finally:
        await client.close()
        srv.close()
        await srv.wait_closed()


async def test_close_with_grace_answers_open_connections_then_ends_them(echo_server: Any) -> None:
    """A stopping sandbox's agent proxy: a client already connected, between two calls of one
    operation (an exec's close-stdin, then its wait), still gets both answers; nobody new gets in;
    close() ends as soon as the clients have gone, and at `grace` at the latest."""
    path, _, server = echo_server
    client = await connect_unix(path)
    lingering = await connect_unix(path)
    assert (await client.call(ECHO_SERVICE, "Echo", Echo(tag=1), timeout=5)).tag == 1
    closing = asyncio.ensure_future(server.close(grace=5.0))
    await asyncio.sleep(0.05)
    assert not closing.done()
    resp = await client.call(ECHO_SERVICE, "Echo", Echo(tag=2, delay_ms=50), timeout=5)
    assert resp.tag == 2  # a call sent after close() began is answered
    with pytest.raises(OSError):
        await connect_unix(path)  # no new client
    await client.close()
    await lingering.close()
    await asyncio.wait_for(closing, 2.0)  # returns once its clients left, long before the grace
    # with no grace (the default) a connection is ended at once, its call in flight failing
    server2 = Server()
    server2.register(ECHO_SERVICE, EchoHandler())
    path2 = path + "2"
    await server2.serve_unix(path2)
    late = await connect_unix(path2)
    call = asyncio.ensure_future(late.call(ECHO_SERVICE, "Sleep", Echo(delay_ms=3000), timeout=10))
    await asyncio.sleep(0.1)
    await server2.close()
    with pytest.raises((RpcError, ConnectionClosedError, ConnectionResetError)):
        await asyncio.wait_for(call, 5.0)
    await late.close()


async def test_close_with_grace_gives_up_on_a_client_that_stays(echo_server: Any) -> None:
    path, _, server = echo_server
    stays = await connect_unix(path)
    assert (await stays.call(ECHO_SERVICE, "Echo", Echo(tag=1), timeout=5)).tag == 1  # the server has it
    loop = asyncio.get_running_loop()
    start = loop.time()
    await server.close(grace=0.3)
    assert 0.25 <= loop.time() - start < 3.0
    with pytest.raises((RpcError, ConnectionClosedError, ConnectionResetError)):
        await stays.call(ECHO_SERVICE, "Echo", Echo(tag=3), timeout=5)
    await stays.close()


class _PlainHandler(EchoHandler):
    """Unary methods as plain functions (answered in the loop turn that read them, server.py), streaming
    ones inherited; Fill and Sleep hand back an awaitable (a wrapper whose target must load first)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def Echo(self, req: Any, ctx: CallContext) -> Any:  # type: ignore[override]
        self.calls += 1
        return Echo(data=req.data, tag=int((ctx.timeout or 0) * 1000))

    def Fail(self, req: Any, ctx: CallContext) -> Any:  # type: ignore[override]
        from pykata.errors import NotFound

        raise NotFound(f"no {req.data.decode()}")

    def Fill(self, req: Any, ctx: CallContext) -> Any:  # type: ignore[override]
        return asyncio.sleep(0.01, Echo(tag=req.tag + 1))

    def Sleep(self, req: Any, ctx: CallContext) -> Any:  # type: ignore[override]
        return asyncio.sleep(req.delay_ms / 1000)


async def test_plain_function_handlers_are_answered_at_once(tmp_path: Path) -> None:
    from pykata.ttrpc.stats import RpcStats

    handler = _PlainHandler()
    server = Server(stats=RpcStats())
    server.register(ECHO_SERVICE, handler)
    path = str(tmp_path / "plain.sock")
    await server.serve_unix(path)
    client = await connect_unix(path)
    try:
        answers = await asyncio.gather(*(client.call(ECHO_SERVICE, "Echo", Echo(data=bytes([i]), tag=i), timeout=2)
                                         for i in range(50)))
        assert [a.data for a in answers] == [bytes([i]) for i in range(50)]
        assert {a.tag for a in answers} == {2000}  # the handler saw the caller's deadline
        assert handler.calls == 50
        # errors map as an async handler's do; the connection goes on
        with pytest.raises(RpcError) as ei:
            await client.call(ECHO_SERVICE, "Fail", Echo(data=b"thing"))
        assert (ei.value.code, ei.value.message) == (Code.NOT_FOUND, "no thing")
        with pytest.raises(RpcError) as ei:
            await client.call_raw("pykata.test.EchoService", "Echo", b"\xff\xff\xff")
        assert ei.value.code == Code.INVALID_ARGUMENT
        # an awaitable handed back is awaited, under the call's deadline
        assert (await client.call(ECHO_SERVICE, "Fill", Echo(tag=1), timeout=5)).tag == 2
        with pytest.raises(RpcError) as ei:
            await client.call(ECHO_SERVICE, "Sleep", Echo(delay_ms=5000), timeout=0.2)
        assert ei.value.code == Code.DEADLINE_EXCEEDED
        # streaming methods (async) are still served by tasks
        assert (await client.call(ECHO_SERVICE, "Echo", Echo(tag=1))).data == b""
        got = [m.tag async for m in client.stream(ECHO_SERVICE, "Count", Echo(tag=3))]
        assert got == [0, 1, 2]
        assert server.stats is not None
        assert [(m, n) for m, n, _, _ in server.stats.snapshot()][:2] == [("Count", 1), ("Echo", 52)]
        assert dict((m, n) for m, n, _, _ in server.stats.snapshot())["Fill"] == 1
    finally:
        await client.close()
        await server.close()
