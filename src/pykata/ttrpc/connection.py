"""The ttrpc connection state machine, sans-IO.

`Connection(role)` turns received bytes into events and the owner's intentions into bytes:

    conn.receive_data(chunk)            # bytes from the peer
    while (event := conn.next_event()):  # RequestReceived / ResponseReceived / DataReceived
        ...
    wire = conn.send_request(...)        # bytes to write

A RemoteProtocolError from next_event() moves the connection to a terminal state: every later call
raises the same error, so a peer that sent garbage cannot get anything more processed. Besides
malformed frames, these are protocol errors: a frame over `max_message_size`, data on a unary call or
after the peer closed its side of the stream, and a frame for a stream id the peer could not know.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from google.protobuf.message import DecodeError

from pykata.record import Record
from pykata.ttrpc._pb import ttrpc_pb2
from pykata.ttrpc.codes import Code
from pykata.ttrpc.errors import LocalProtocolError, RemoteProtocolError
from pykata.ttrpc.frames import MAX_MESSAGE_SIZE, Flags, Frame, FrameDecoder, FrameType, encode_frame
from pykata.ttrpc.session import parse_hello

MAX_STREAM_ID = (1 << 32) - 1


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class RequestReceived(Record):
    __slots__ = ("metadata", "method", "payload", "remote_open", "service", "stream_id", "streaming",
                 "timeout_nano")
    __match_args__ = ("stream_id", "service", "method", "payload", "timeout_nano", "metadata", "remote_open",
                      "streaming")

    def __init__(self, stream_id: int, service: str, method: str, payload: bytes, timeout_nano: int,
                 metadata: dict[str, list[str]], remote_open: bool, streaming: bool) -> None:
        self.stream_id = stream_id
        self.service = service
        self.method = method
        self.payload = payload
        self.timeout_nano = timeout_nano
        self.metadata = metadata
        # True when the client will send Data frames after the request (client streaming)
        self.remote_open = remote_open
        # False for a plain unary request (no flags)
        self.streaming = streaming


class ResponseReceived(Record):
    __slots__ = ("code", "details", "message", "payload", "stream_id")
    __match_args__ = ("stream_id", "code", "message", "details", "payload")

    def __init__(self, stream_id: int, code: Code, message: str, details: tuple[object, ...],
                 payload: bytes) -> None:
        self.stream_id = stream_id
        self.code = code
        self.message = message
        self.details = details
        self.payload = payload


class DataReceived(Record):
    __slots__ = ("end_stream", "payload", "stream_id")
    __match_args__ = ("stream_id", "payload", "end_stream")

    def __init__(self, stream_id: int, payload: bytes, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.payload = payload
        self.end_stream = end_stream


class HelloReceived(Record):
    """A host's session hello (pykata.ttrpc.session), at a frame boundary: the owner starts a new
    session (`new_session`) and echoes `nonce`."""

    __slots__ = ("nonce",)
    __match_args__ = ("nonce",)

    def __init__(self, nonce: bytes) -> None:
        self.nonce = nonce


Event = RequestReceived | ResponseReceived | DataReceived | HelloReceived


class _StreamState:
    __slots__ = ("expects_data", "extra", "local_closed", "remote_closed")

    def __init__(self, local_closed: bool = False, remote_closed: bool = False, expects_data: bool = True) -> None:
        self.local_closed = local_closed
        self.remote_closed = remote_closed
        # client side: the server may send Data frames (a streaming method); False for a unary call
        self.expects_data = expects_data
        self.extra: dict[str, object] = {}


class Connection:
    """One ttrpc connection's protocol state for the client or the server role."""

    def __init__(self, role: Role, *, max_message_size: int = MAX_MESSAGE_SIZE, sessions: bool = False) -> None:
        """`max_message_size` caps every frame both ways (at most ttrpc's 4 MiB): a bigger frame from
        the peer is a RemoteProtocolError, a bigger message of ours a LocalProtocolError.
        `sessions` (server role): a frame that is a host's session hello is a HelloReceived event."""
        self.role = role
        self.sessions = sessions and role is Role.SERVER
        self.max_message_size = max_message_size
        self._decoder = FrameDecoder(max_message_size)
        self._next_stream_id = 1
        # server side: the highest stream id a request arrived on (later ids were never opened)
        self._highest_request_id = 0
        self._streams: dict[int, _StreamState] = {}
        self._error: RemoteProtocolError | None = None
        self._eof = False
        # frames for streams we no longer track (cancelled calls, answered streams) are dropped
        self.dropped_frames = 0

    # -- receiving ---------------------------------------------------------------------------------

    @property
    def failed(self) -> RemoteProtocolError | None:
        return self._error

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; an empty chunk means end of stream."""
        if not data:
            self._eof = True
            return
        self._decoder.feed(data)

    def next_event(self) -> Event | None:
        """Return the next event, or None when more bytes are needed.

        Raises RemoteProtocolError if the peer broke the protocol (terminal), including a
        half frame left at end of stream.
        """
        if self._error is not None:
            raise self._error
        while True:
            try:
                frame = self._decoder.next_frame()
                if frame is None:
                    if self._eof and self._decoder.buffered:
                        raise RemoteProtocolError(
                            f"connection closed in the middle of a frame ({self._decoder.buffered} bytes)"
                        )
                    return None
                if self.sessions and (nonce := parse_hello(frame)) is not None:
                    return HelloReceived(nonce)
                event = self._handle(frame)
            except RemoteProtocolError as e:
                self._error = e
                raise
            if event is not None:
                return event

    def resync(self) -> int:
        """Forget a protocol error and skip to the next plausible frame header (byte streams
        without a reconnect signal, e.g. virtio-serial). Returns the number of bytes dropped."""
        self._error = None
        return self._decoder.resync()

    def reset(self) -> None:
        """Start over as a fresh connection (a new peer on the same byte stream)."""
        self._decoder.clear()
        self._streams.clear()
        self._error = None
        self._eof = False
        self._highest_request_id = 0

    def new_session(self) -> None:
        """Forget every stream and error, keep the bytes not decoded yet: they come after a hello and
        are the new session's."""
        self._streams.clear()
        self._error = None
        self._highest_request_id = 0

    def _handle(self, frame: Frame) -> Event | None:
        if self.role is Role.SERVER:
            return self._handle_as_server(frame)
        return self._handle_as_client(frame)

    def _handle_as_server(self, frame: Frame) -> Event | None:
        sid = frame.stream_id
        if frame.type is FrameType.REQUEST:
            if sid % 2 == 0:
                raise RemoteProtocolError(f"client used even stream id {sid}")
            if sid in self._streams:
                raise RemoteProtocolError(f"request on stream {sid}, which is already open")
            req = ttrpc_pb2.Request()
            try:
                req.ParseFromString(frame.data)
            except DecodeError as e:
                raise RemoteProtocolError(f"undecodable request on stream {sid}: {e}") from None
            remote_open = bool(frame.flags & Flags.REMOTE_OPEN)
            self._streams[sid] = _StreamState(remote_closed=not remote_open)
            self._highest_request_id = max(self._highest_request_id, sid)
            metadata: dict[str, list[str]] = {}
            for kv in req.metadata:
                metadata.setdefault(kv.key, []).append(kv.value)
            return RequestReceived(
                sid, req.service, req.method, req.payload, req.timeout_nano, metadata,
                remote_open=remote_open, streaming=frame.flags != Flags.NONE,
            )
        if frame.type is FrameType.DATA:
            if sid not in self._streams and (sid % 2 == 0 or sid > self._highest_request_id):
                raise RemoteProtocolError(f"client sent data on stream {sid}, which it never opened")
            return self._handle_data(frame)
        raise RemoteProtocolError(f"client sent a {frame.type.name} frame on stream {sid}")

    def _handle_as_client(self, frame: Frame) -> Event | None:
        sid = frame.stream_id
        if sid % 2 == 0 or sid >= self._next_stream_id:
            raise RemoteProtocolError(f"server sent a {frame.type.name} frame on stream {sid}, which we never opened")
        if frame.type is FrameType.RESPONSE:
            if self._streams.pop(sid, None) is None:
                self.dropped_frames += 1
                return None
            resp = ttrpc_pb2.Response()
            try:
                resp.ParseFromString(frame.data)
            except DecodeError as e:
                raise RemoteProtocolError(f"undecodable response on stream {sid}: {e}") from None
            status = resp.status
            return ResponseReceived(
                sid, Code.from_wire(status.code), status.message, tuple(status.details), resp.payload
            )
        if frame.type is FrameType.DATA:
            return self._handle_data(frame)
        raise RemoteProtocolError(f"server sent a {frame.type.name} frame on stream {sid}")

    def _handle_data(self, frame: Frame) -> DataReceived | None:
        """Data on an open stream. Data for a stream we no longer track is dropped (a cancelled
        call, an answered stream); data on a unary call, or after the peer closed its side of a
        stream we still track, is a protocol error: no well-behaved peer sends it, and a peer
        that does must not make us queue it."""
        state = self._streams.get(frame.stream_id)
        if state is None:
            self.dropped_frames += 1
            return None
        who = "client" if self.role is Role.SERVER else "server"
        if not state.expects_data:
            raise RemoteProtocolError(f"{who} sent data on stream {frame.stream_id}, a unary call")
        if state.remote_closed:
            raise RemoteProtocolError(f"{who} sent data on stream {frame.stream_id} after closing its side")
        end = bool(frame.flags & Flags.REMOTE_CLOSED)
        state.remote_closed = end
        self._maybe_finish(frame.stream_id, state)
        return DataReceived(frame.stream_id, b"" if frame.flags & Flags.NO_DATA else frame.data, end)

    def _maybe_finish(self, sid: int, state: _StreamState) -> None:
        if state.local_closed and state.remote_closed:
            self._streams.pop(sid, None)

    # -- sending -----------------------------------------------------------------------------------

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
        client_streaming: bool = False,
        server_streaming: bool = False,
    ) -> tuple[int, bytes]:
        """Open a stream with a request; returns (stream id, bytes to write).

        Raises LocalProtocolError when called on a server or when the stream ids are exhausted
        or the request is over the size limit.
        """
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends requests")
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted on this connection")
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
        for k, v in metadata:
            req.metadata.add(key=k, value=v)
        expects_data = server_streaming
        if client_streaming:
            flags = Flags.REMOTE_OPEN
        elif server_streaming:
            flags = Flags.REMOTE_CLOSED
        else:
            flags = Flags.NONE
        wire = encode_frame(sid, FrameType.REQUEST, flags, req.SerializeToString(), max_size=self.max_message_size)
        self._next_stream_id = sid + 2
        self._streams[sid] = _StreamState(local_closed=not client_streaming, expects_data=expects_data)
        return sid, wire

    def send_data(self, stream_id: int, payload: bytes, *, end_stream: bool = False) -> bytes:
        """Data on an open stream. Raises LocalProtocolError if this side already closed it."""
        state = self._streams.get(stream_id)
        if state is None or state.local_closed:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        flags = Flags.NONE
        if end_stream:
            flags |= Flags.REMOTE_CLOSED
            state.local_closed = True
            if not payload:
                flags |= Flags.NO_DATA
        wire = encode_frame(stream_id, FrameType.DATA, flags, payload, max_size=self.max_message_size)
        self._maybe_finish(stream_id, state)
        return wire

    def send_response(
        self, stream_id: int, payload: bytes = b"", code: Code = Code.OK, message: str = "",
        details: Iterable[Any] = (),
    ) -> bytes:
        """Finish a stream with a response (server only)."""
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only a server sends responses")
        self._streams.pop(stream_id, None)
        resp = ttrpc_pb2.Response(payload=payload)
        resp.status.code = int(code)
        resp.status.message = message
        for d in details:
            resp.status.details.add().CopyFrom(d)
        return encode_frame(stream_id, FrameType.RESPONSE, Flags.NONE, resp.SerializeToString(),
                            max_size=self.max_message_size)

    def forget(self, stream_id: int) -> None:
        """Stop tracking a stream (a cancelled call); frames that still arrive for it are dropped."""
        self._streams.pop(stream_id, None)
