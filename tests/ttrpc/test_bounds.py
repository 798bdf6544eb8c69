"""What a hostile peer can make a ttrpc endpoint hold: frames, data on unary calls, unread streams.

The sans-IO rules first (no event loop), then the asyncio server and client over real unix sockets,
with the process's resident memory measured while a peer floods them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pykata.ttrpc import (
    Code,
    Connection,
    DataReceived,
    Flags,
    FrameType,
    LocalProtocolError,
    RemoteProtocolError,
    RequestReceived,
    Role,
    RpcError,
    connect_unix,
    encode_frame,
)
from pykata.ttrpc._pb import ttrpc_pb2
from tests.ttrpc.echo_pb import ECHO_SERVICE, Echo

MIB = 1 << 20


def _request(sid: int, method: str, flags: Flags = Flags.NONE, payload: bytes = b"") -> bytes:
    req = ttrpc_pb2.Request(service="pykata.test.EchoService", method=method, payload=payload)
    return encode_frame(sid, FrameType.REQUEST, flags, req.SerializeToString())


def _events(conn: Connection) -> list[Any]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


# -- sans-IO -----------------------------------------------------------------------------------------

def test_server_data_on_a_unary_call_is_a_protocol_error() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(_request(1, "Echo") + encode_frame(1, FrameType.DATA, Flags.NONE, b"x"))
    assert isinstance(server.next_event(), RequestReceived)
    with pytest.raises(RemoteProtocolError, match="after closing its side"):
        server.next_event()


def test_server_data_on_a_stream_never_opened_is_a_protocol_error_answered_one_is_dropped() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(_request(3, "Echo"))
    assert isinstance(server.next_event(), RequestReceived)
    server.send_response(3, b"")
    server.receive_data(encode_frame(3, FrameType.DATA, Flags.NONE, b"late") +
                        encode_frame(1, FrameType.DATA, Flags.NONE, b"old id"))
    assert _events(server) == [] and server.dropped_frames == 2
    server.receive_data(encode_frame(5, FrameType.DATA, Flags.NONE, b"future"))
    with pytest.raises(RemoteProtocolError, match="never opened"):
        server.next_event()


def test_client_data_on_a_unary_call_and_answers_on_unknown_streams_are_protocol_errors() -> None:
    for wire, problem in [
        (encode_frame(1, FrameType.DATA, Flags.NONE, b"x"), "a unary call"),
        (encode_frame(7, FrameType.RESPONSE, Flags.NONE, b""), "never opened"),
        (encode_frame(2, FrameType.RESPONSE, Flags.NONE, b""), "never opened"),
    ]:
        client = Connection(Role.CLIENT)
        client.send_request("s", "m", b"")
        client.receive_data(wire)
        with pytest.raises(RemoteProtocolError, match=problem):
            client.next_event()


def test_client_server_streaming_data_after_end_of_stream_is_a_protocol_error() -> None:
    client = Connection(Role.CLIENT)
    sid, _ = client.send_request("s", "m", b"", client_streaming=True, server_streaming=True)
    client.receive_data(encode_frame(sid, FrameType.DATA, Flags.NONE, b"a") +
                        encode_frame(sid, FrameType.DATA, Flags.REMOTE_CLOSED, b"b"))
    assert _events(client) == [DataReceived(sid, b"a", False), DataReceived(sid, b"b", True)]
    client.receive_data(encode_frame(sid, FrameType.DATA, Flags.NONE, b"c"))
    with pytest.raises(RemoteProtocolError, match="after closing"):
        client.next_event()


def test_message_size_cap_applies_both_ways() -> None:
    client = Connection(Role.CLIENT, max_message_size=1000)
    with pytest.raises(LocalProtocolError, match="1000-byte limit"):
        client.send_request("s", "m", bytes(1000))
    client.send_request("s", "m", b"")
    client.receive_data(encode_frame(1, FrameType.RESPONSE, Flags.NONE, bytes(1001)))
    with pytest.raises(RemoteProtocolError, match="exceeds the 1000-byte limit"):
        client.next_event()
    server = Connection(Role.SERVER, max_message_size=1000)
    server.receive_data(_request(1, "Echo", payload=bytes(100)))
    assert isinstance(server.next_event(), RequestReceived)
    with pytest.raises(LocalProtocolError):
        server.send_response(1, bytes(2000))
    with pytest.raises(ValueError):
        Connection(Role.SERVER, max_message_size=(4 << 20) + 1)


# -- over sockets ------------------------------------------------------------------------------------

def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _flood(writer: asyncio.StreamWriter, sid: int, n: int, seconds: float) -> int:
    """Send up to `n` 1 MiB data frames on `sid`, waiting for the socket each time; return how many
    the peer took within `seconds` (a peer that stops reading stops the flood)."""
    frame = encode_frame(sid, FrameType.DATA, Flags.NONE, Echo(data=bytes(MIB - 64)).SerializeToString())
    sent = 0
    try:
        async with asyncio.timeout(seconds):
            for _ in range(n):
                writer.write(frame)
                await writer.drain()
                sent += 1
    except TimeoutError:
        pass
    except ConnectionError:
        pass
    return sent


async def test_unary_method_with_remote_open_is_refused_and_its_data_never_queued(echo_server: Any) -> None:
    """The issue's probe: 256 x 1 MiB data frames after a request to a unary method. Before, the
    server queued them all (RSS +260 MiB); now the call is refused at once and the data dropped."""
    path, _, server = echo_server
    reader, writer = await asyncio.open_unix_connection(path)
    before = _rss()
    writer.write(_request(1, "Sleep", Flags.REMOTE_OPEN, Echo(delay_ms=10_000).SerializeToString()))
    sent = await _flood(writer, 1, 256, 30)
    header = await asyncio.wait_for(reader.readexactly(10), 5)
    resp = ttrpc_pb2.Response()
    resp.ParseFromString(await reader.readexactly(int.from_bytes(header[:4], "big")))
    grown = _rss() - before
    assert sent == 256
    assert resp.status.code == Code.INVALID_ARGUMENT and "not a client-streaming method" in resp.status.message
    assert grown < 32 * MIB, f"RSS grew by {grown >> 20} MiB"
    (conn,) = server._connections
    assert not conn.inbound and not conn.tasks
    writer.close()


async def test_data_on_a_plain_unary_call_closes_the_connection(echo_server: Any, echo_client: Any) -> None:
    path = echo_server[0]
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(_request(1, "Sleep", Flags.NONE, Echo(delay_ms=10_000).SerializeToString()))
    writer.write(encode_frame(1, FrameType.DATA, Flags.NONE, bytes(MIB)))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    writer.close()
    assert (await echo_client.call(ECHO_SERVICE, "Echo", Echo(tag=4), timeout=5)).tag == 4


async def test_unread_client_stream_stops_the_server_reading(echo_server: Any) -> None:
    """A client-streaming handler that does not read: the server holds about max_inbound_bytes of
    its data, then stops reading the connection (back-pressure), and loses nothing once it reads."""
    path, handler, server = echo_server
    reader, writer = await asyncio.open_unix_connection(path)
    before = _rss()
    writer.write(_request(1, "Hold", Flags.REMOTE_OPEN))
    sent = await _flood(writer, 1, 256, 3)
    grown = _rss() - before
    (conn,) = server._connections
    assert not conn._transport.is_reading()
    assert sent < 64, f"{sent} MiB accepted"
    assert conn.inbound[1].bytes <= server.max_inbound_bytes + MIB
    assert grown < server.max_inbound_bytes + 40 * MIB, f"RSS grew by {grown >> 20} MiB"
    handler.release.set()
    writer.write(encode_frame(1, FrameType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b""))
    await writer.drain()
    header = await asyncio.wait_for(reader.readexactly(10), 10)
    resp = ttrpc_pb2.Response()
    resp.ParseFromString(await reader.readexactly(int.from_bytes(header[:4], "big")))
    answer = Echo()
    answer.ParseFromString(resp.payload)
    # the frame being written when the flood stopped still arrives
    assert resp.status.code == Code.OK and answer.tag in (sent, sent + 1)
    writer.close()


async def test_requests_in_flight_are_capped_in_bytes(echo_server: Any) -> None:
    path, _, server = echo_server
    server.max_inflight_bytes = 8 * MIB
    reader, writer = await asyncio.open_unix_connection(path)
    slow = Echo(delay_ms=10_000, data=bytes(3 * MIB)).SerializeToString()
    for i in range(4):
        writer.write(_request(2 * i + 1, "Sleep", Flags.NONE, slow))
    await writer.drain()
    header = await asyncio.wait_for(reader.readexactly(10), 5)
    resp = ttrpc_pb2.Response()
    resp.ParseFromString(await reader.readexactly(int.from_bytes(header[:4], "big")))
    assert int.from_bytes(header[4:8], "big") == 5  # the third 3 MiB request is one too many
    assert resp.status.code == Code.RESOURCE_EXHAUSTED and "in flight" in resp.status.message
    writer.close()


async def test_client_fails_a_stream_it_does_not_read_and_keeps_the_connection(tmp_path: Path) -> None:
    """A server that floods a streaming call: past max_stream_buffer the call fails with
    RESOURCE_EXHAUSTED, the rest of the flood is dropped, and other calls on the connection work."""
    path = str(tmp_path / "flood.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            header = await reader.readexactly(10)
            sid = int.from_bytes(header[4:8], "big")
            req = ttrpc_pb2.Request()
            req.ParseFromString(await reader.readexactly(int.from_bytes(header[:4], "big")))
            if req.method == "Count":
                chunk = encode_frame(sid, FrameType.DATA, Flags.NONE, Echo(data=bytes(MIB - 64)).SerializeToString())
                for _ in range(64):
                    writer.write(chunk)
                    await writer.drain()
            else:
                resp = ttrpc_pb2.Response(payload=Echo(tag=11).SerializeToString())
                writer.write(encode_frame(sid, FrameType.RESPONSE, Flags.NONE, resp.SerializeToString()))

    srv = await asyncio.start_unix_server(serve, path)
    client = await connect_unix(path, max_stream_buffer=4 * MIB)
    try:
        before = _rss()
        stream = client.stream(ECHO_SERVICE, "Count", Echo(tag=1), timeout=20)
        await asyncio.sleep(0.5)
        with pytest.raises(RpcError) as ei:
            while await stream.recv() is not None:
                await asyncio.sleep(10)  # a caller that does not keep up
        assert ei.value.code == Code.RESOURCE_EXHAUSTED
        assert (await client.call(ECHO_SERVICE, "Echo", Echo(), timeout=10)).tag == 11
        assert _rss() - before < 32 * MIB
        assert client._p.conn.dropped_frames > 0
    finally:
        await client.close()
        srv.close()
        await srv.wait_closed()
