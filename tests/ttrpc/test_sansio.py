"""The sans-IO core: framing and the connection state machine, with no event loop."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pykata.ttrpc import (
    MAX_MESSAGE_SIZE,
    Code,
    Connection,
    DataReceived,
    Flags,
    FrameDecoder,
    FrameType,
    LocalProtocolError,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
    Role,
    encode_frame,
)
from pykata.ttrpc._pb import ttrpc_pb2


def test_header_layout_is_big_endian_10_bytes() -> None:
    wire = encode_frame(3, FrameType.REQUEST, Flags.REMOTE_CLOSED, b"abc")
    assert wire == struct.pack(">IIBB", 3, 3, 1, 1) + b"abc"
    assert len(wire) == 13


def test_decoder_reassembles_byte_by_byte() -> None:
    wire = encode_frame(5, FrameType.DATA, Flags.NONE, b"hello") + encode_frame(7, FrameType.RESPONSE, 0, b"")
    dec = FrameDecoder()
    frames = []
    for b in wire:
        dec.feed(bytes([b]))
        while (f := dec.next_frame()) is not None:
            frames.append(f)
    assert [(f.stream_id, f.type, f.data) for f in frames] == [
        (5, FrameType.DATA, b"hello"), (7, FrameType.RESPONSE, b"")]


@pytest.mark.parametrize("header,problem", [
    (struct.pack(">IIBB", MAX_MESSAGE_SIZE + 1, 1, 1, 0), "exceeds"),
    (struct.pack(">IIBB", 0, 1, 9, 0), "unknown frame type"),
    (struct.pack(">IIBB", 0, 0, 1, 0), "reserved"),
])
def test_decoder_rejects_impossible_headers(header: bytes, problem: str) -> None:
    dec = FrameDecoder()
    dec.feed(header)
    with pytest.raises(RemoteProtocolError, match=problem):
        dec.next_frame()


def test_encoder_refuses_oversize_and_bad_ids() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(1, FrameType.DATA, Flags.NONE, bytes(MAX_MESSAGE_SIZE + 1))
    with pytest.raises(LocalProtocolError):
        encode_frame(0, FrameType.DATA, Flags.NONE, b"")


def test_unary_round_trip_between_two_state_machines() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, wire = client.send_request("svc", "M", b"payload", timeout_nano=5, metadata=[("k", "a"), ("k", "b")])
    assert sid == 1
    server.receive_data(wire)
    ev = server.next_event()
    assert isinstance(ev, RequestReceived)
    assert (ev.service, ev.method, ev.payload, ev.timeout_nano) == ("svc", "M", b"payload", 5)
    assert ev.metadata == {"k": ["a", "b"]} and not ev.streaming
    client.receive_data(server.send_response(sid, b"answer", Code.NOT_FOUND, "gone"))
    resp = client.next_event()
    assert isinstance(resp, ResponseReceived)
    assert (resp.code, resp.message, resp.payload) == (Code.NOT_FOUND, "gone", b"answer")
    # next call uses the next odd id
    assert client.send_request("svc", "M", b"")[0] == 3


def test_client_streaming_flags_and_end_of_stream() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, wire = client.send_request("s", "m", b"", client_streaming=True)
    wire += client.send_data(sid, b"one") + client.send_data(sid, b"", end_stream=True)
    server.receive_data(wire)
    req = server.next_event()
    assert isinstance(req, RequestReceived) and req.remote_open and req.streaming
    assert server.next_event() == DataReceived(sid, b"one", False)
    assert server.next_event() == DataReceived(sid, b"", True)
    with pytest.raises(LocalProtocolError):
        client.send_data(sid, b"late")


def test_response_for_forgotten_stream_is_dropped_not_fatal() -> None:
    client = Connection(Role.CLIENT)
    sid, _ = client.send_request("s", "m", b"")
    client.forget(sid)
    server = Connection(Role.SERVER)
    client.receive_data(server.send_response(sid, b"late"))
    assert client.next_event() is None
    assert client.dropped_frames == 1


def test_server_rejects_even_stream_ids_and_duplicates() -> None:
    req = ttrpc_pb2.Request(service="s", method="m").SerializeToString()
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame(2, FrameType.REQUEST, Flags.NONE, req))
    with pytest.raises(RemoteProtocolError, match="even"):
        server.next_event()
    # terminal: the same error again
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame(1, FrameType.REQUEST, Flags.REMOTE_OPEN, req) * 2)
    assert server.next_event() is not None
    with pytest.raises(RemoteProtocolError, match="already open"):
        server.next_event()


def test_truncated_frame_at_eof_is_an_error() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame(1, FrameType.REQUEST, Flags.NONE, b"\x0a\x01s")[:-1])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_event()


def test_resync_skips_garbage_to_the_next_frame() -> None:
    req = ttrpc_pb2.Request(service="s", method="m").SerializeToString()
    server = Connection(Role.SERVER)
    # stale tail of an older host connection, then a fresh request
    server.receive_data(b"\xff\xff\x00\x07garbage" + encode_frame(1, FrameType.REQUEST, Flags.NONE, req))
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    for _ in range(64):
        server.resync()
        try:
            ev = server.next_event()
        except RemoteProtocolError:
            continue
        break
    assert isinstance(ev, RequestReceived) and ev.method == "m"


# -- fuzzing ---------------------------------------------------------------------------------------

@settings(max_examples=3000, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
@example([b"\x00\x40\x00\x01" + b"\x00\x00\x00\x01\x01\x00"])  # length just over 4 MiB
@example([b"\x00\x00\x00\x02\x00\x00\x00\x01\x01\x00\xff\xff"])  # request with garbage protobuf
@example([b"\x00\x00\x00\x00\x00\x00\x00\x01\x03\x01"])  # data for a stream that is not open
def test_fuzz_server_state_machine_never_crashes(chunks: list[bytes]) -> None:
    """Any byte sequence either yields events or a RemoteProtocolError; nothing else escapes."""
    conn = Connection(Role.SERVER)
    for chunk in chunks:
        conn.receive_data(chunk)
        try:
            while conn.next_event() is not None:
                pass
        except RemoteProtocolError:
            with pytest.raises(RemoteProtocolError):
                conn.next_event()
            return


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.sampled_from(list(FrameType)),
                          st.integers(0, 7), st.binary(max_size=300)), max_size=8),
       st.integers(1, 50))
def test_fuzz_decoder_round_trips_any_valid_frames(frames: list[tuple[int, FrameType, int, bytes]],
                                                   chunk: int) -> None:
    wire = b"".join(encode_frame(s, t, Flags(f), d) for s, t, f, d in frames)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(wire), chunk):
        dec.feed(wire[i:i + chunk])
        while (fr := dec.next_frame()) is not None:
            out.append((fr.stream_id, fr.type, int(fr.flags), fr.data))
    assert out == frames


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_client_never_crashes_on_server_garbage(garbage: bytes) -> None:
    client = Connection(Role.CLIENT)
    for _ in range(3):
        client.send_request("s", "m", b"")
    client.receive_data(garbage)
    try:
        while client.next_event() is not None:
            pass
    except RemoteProtocolError:
        pass
