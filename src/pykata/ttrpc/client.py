"""asyncio ttrpc client: many concurrent calls multiplexed on one connection.

    client = await connect_unix("/run/x.sock")
    async with client:
        resp = await client.call(TASK, "State", StateRequest(id="c1"), timeout=5)
        task = client.stub(TASK)            # same, attribute style
        resp = await task.State(StateRequest(id="c1"))

Each answer is routed to its caller by stream id. A deadline is sent to the server as timeout_nano
and enforced here too. When the connection drops, every pending call fails at once with a
ConnectionClosedError naming its method.

The server is not trusted: each frame is at most `max_message_size`, a frame the protocol does not
allow (data on a unary call, an answer on a stream never opened) closes the connection, and a
streaming call whose unread messages pass `max_stream_buffer` bytes fails with RESOURCE_EXHAUSTED
(the client keeps reading the connection for the other calls; that stream's later frames are dropped).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import math
import termios
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any

from pykata.ttrpc.codes import Code
from pykata.ttrpc.connection import DataReceived, Event, HelloReceived, ResponseReceived, Role
from pykata.ttrpc.errors import ConnectionClosedError, LocalProtocolError, RpcError, SessionRefused
from pykata.ttrpc.frames import MAX_MESSAGE_SIZE
from pykata.ttrpc.service import ServiceLike
from pykata.ttrpc.session import EchoHunter, Hunt, flush_bytes, hello_frame, new_nonce
from pykata.ttrpc.transport import ConnectionProtocol, attach_fd

Metadata = Mapping[str, str | Iterable[str]]

log = logging.getLogger("pykata.ttrpc.client")
_END = object()
# Unread server messages of one streaming call before the call is failed.
MAX_STREAM_BUFFER = 16 << 20


def _flatten(metadata: Metadata | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in (metadata or {}).items():
        out.extend([(k, v)] if isinstance(v, str) else [(k, x) for x in v])
    return out


class _Pending:
    __slots__ = ("buffered", "method", "queue", "response")

    def __init__(self, method: str, loop: asyncio.AbstractEventLoop, streaming: bool) -> None:
        self.method = method
        self.buffered = 0
        self.response: asyncio.Future[ResponseReceived] = loop.create_future()
        # server-sent Data payloads for streaming calls
        self.queue: asyncio.Queue[object] | None = asyncio.Queue() if streaming else None


class _ClientProtocol(ConnectionProtocol):
    def __init__(self, *, max_message_size: int = MAX_MESSAGE_SIZE,
                 max_stream_buffer: int = MAX_STREAM_BUFFER, session: bool = False, flush: int = 0) -> None:
        super().__init__(Role.CLIENT, max_message_size=max_message_size)
        self.max_stream_buffer = max_stream_buffer
        self.pending: dict[int, _Pending] = {}
        # a session hello first (pykata.ttrpc.session); nothing is read as ttrpc before its echo
        self._nonce = new_nonce() if session else b""
        self._hunter = EchoHunter(self._nonce) if session else None
        self._hello_sent = False
        self._flush = flush if session else 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._hunter is not None and not self._hello_sent:
            self._hello_sent = True
            if self._flush:
                self.write(flush_bytes(self._flush))
            self.write(hello_frame(self._nonce))

    def hello_again(self) -> bool:
        """Send a new hello (a new nonce) while the echo of the last one has not come: that hello was
        lost (a guest that closed its port as it came discards what was queued in it). False when the
        session is open already or the connection is closed."""
        if self._hunter is None or self.is_closing():
            return False
        self._nonce = new_nonce()
        self._hunter = EchoHunter(self._nonce)
        self.write(hello_frame(self._nonce))
        return True

    def data_received(self, data: bytes | memoryview) -> None:
        if self._hunter is None:
            super().data_received(data)
            return
        state, rest = self._hunter.feed(data)
        if state is Hunt.WAITING:
            return
        if state is Hunt.OLD_AGENT:
            self.abort(SessionRefused("the agent predates session hellos (agent protocol < 8): rebuild the "
                                      "guest image (`pykata image build`) and the template (`pykata factory init`)",
                                      old_agent=True))
            return
        if state is Hunt.TOO_MUCH:
            self.abort(SessionRefused(f"no echo of the session hello after {self._hunter.dropped} bytes "
                                      "of an earlier session"))
            return
        if self._hunter.dropped:
            log.info("ttrpc: dropped %d bytes of an earlier session before the echo", self._hunter.dropped)
        self._hunter = None
        if rest:
            super().data_received(rest)

    def eof_received(self) -> bool | None:
        if self._hunter is not None:
            self._finish(SessionRefused("the connection ended before the session hello was echoed"))
        return super().eof_received()

    def handle_event(self, event: Event) -> None:
        if isinstance(event, HelloReceived):
            return  # only a server's Connection decodes hellos
        p = self.pending.get(event.stream_id)
        if p is None:
            return
        if isinstance(event, ResponseReceived):
            del self.pending[event.stream_id]
            if not p.response.done():
                p.response.set_result(event)
            if p.queue is not None:
                p.queue.put_nowait(_END)
        elif isinstance(event, DataReceived):
            if p.queue is None:
                return
            if event.payload or not event.end_stream:
                p.buffered += len(event.payload)
                if p.buffered > self.max_stream_buffer:
                    self._overflow(event.stream_id, p)
                    return
                p.queue.put_nowait(event.payload)
            if event.end_stream:
                # ttrpc 1.2: a server may finish a stream with Data[remote closed] and no Response
                del self.pending[event.stream_id]
                if not p.response.done():
                    p.response.set_result(ResponseReceived(event.stream_id, Code.OK, "", (), b""))
                p.queue.put_nowait(_END)

    def _overflow(self, sid: int, p: _Pending) -> None:
        del self.pending[sid]
        self.conn.forget(sid)
        err = RpcError(Code.RESOURCE_EXHAUSTED,
                       f"server sent over {self.max_stream_buffer} bytes the caller has not read", p.method)
        if not p.response.done():
            p.response.set_exception(err)
            p.response.exception()
        assert p.queue is not None
        # what was queued is of no use any more: free it now
        while not p.queue.empty():
            p.queue.get_nowait()
        p.queue.put_nowait(err)

    def on_closed(self, exc: BaseException | None) -> None:
        why = f"connection closed: {exc}" if exc else "connection closed by peer"
        for p in self.pending.values():
            if not p.response.done():
                p.response.set_exception(ConnectionClosedError(why, p.method))
                p.response.exception()  # mark retrieved: a caller may already be gone
            if p.queue is not None:
                p.queue.put_nowait(ConnectionClosedError(why, p.method))
        self.pending.clear()


class Client:
    """A ttrpc client over one connection. Use `connect_unix` / `connect_fd` to make one."""

    def __init__(self, protocol: _ClientProtocol, *, default_timeout: float | None = None) -> None:
        self._p = protocol
        self.default_timeout = default_timeout

    @property
    def closed(self) -> bool:
        return self._p.is_closing()

    @property
    def close_reason(self) -> BaseException | None:
        """Why the connection ended (None while open or when the peer closed it)."""
        return self._p.close_reason

    async def wait_closed(self) -> None:
        await asyncio.shield(self._p.closed)

    def hello_again(self) -> bool:
        """A session connection whose echo has not come: send a new hello (see _ClientProtocol)."""
        return self._p.hello_again()

    def unread_by_peer(self) -> int:
        """Bytes written on this connection that the peer has not read yet (0 once it read them all):
        what the transport still holds plus the socket's send queue (SIOCOUTQ; on a unix socket the
        memory its queued buffers take, so only 0 is exact). Behind QEMU's chardev socket, QEMU reads
        only what the guest has room for in its port, so 0 means the guest has taken every byte.
        A closed connection or a descriptor that is not a socket counts its transport's buffer only."""
        transport = self._p._writer
        if transport is None or transport.is_closing():
            return 0
        queued = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            buf = array.array("i", [0])
            with contextlib.suppress(OSError):
                fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
                queued += buf[0]
        return queued

    async def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionClosedError. Idempotent.

        Returns once the socket itself is closed: a peer that takes one connection at a time (QEMU's
        chardev behind a virtio-serial port) can accept the next one as soon as this returns.
        """
        self._p.abort(None)
        await self.wait_closed()
        if self._p._transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._p.lost), 5)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def stub(self, service: ServiceLike) -> Stub:
        return Stub(self, service)

    # -- calls -------------------------------------------------------------------------------------

    def _open(
        self, service: str, method: str, payload: bytes, timeout: float | None, metadata: Metadata | None,
        *, client_streaming: bool = False, server_streaming: bool = False,
    ) -> tuple[int, _Pending]:
        full = f"/{service}/{method}"
        if self._p.is_closing():
            raise ConnectionClosedError("connection is closed", full)
        timeout_nano = 0 if timeout is None else max(1, math.ceil(timeout * 1e9))
        try:
            sid, wire = self._p.conn.send_request(
                service, method, payload, timeout_nano=timeout_nano, metadata=_flatten(metadata),
                client_streaming=client_streaming, server_streaming=server_streaming,
            )
        except LocalProtocolError as e:
            raise RpcError(Code.RESOURCE_EXHAUSTED, str(e), full) from None
        p = _Pending(full, asyncio.get_running_loop(), client_streaming or server_streaming)
        self._p.pending[sid] = p
        try:
            self._p.write(wire)
        except ConnectionResetError:
            self._forget(sid)
            raise ConnectionClosedError("connection is closed", full) from None
        return sid, p

    def _forget(self, sid: int) -> None:
        self._p.pending.pop(sid, None)
        self._p.conn.forget(sid)

    async def call_raw(
        self, service: str, method: str, payload: bytes, *,
        timeout: float | None = None, metadata: Metadata | None = None,
    ) -> bytes:
        """One unary call with serialized payloads. Raises RpcError (ConnectionClosedError when the
        connection drops; code DEADLINE_EXCEEDED when `timeout` seconds pass)."""
        timeout = self.default_timeout if timeout is None else timeout
        sid, p = self._open(service, method, payload, timeout, metadata)
        try:
            await self._p.drain()
            async with asyncio.timeout(timeout):
                resp = await p.response
        except TimeoutError:
            raise RpcError(Code.DEADLINE_EXCEEDED, f"no answer within {timeout}s", p.method) from None
        finally:
            if self._p.pending.get(sid) is p:  # timed out or cancelled: drop its late answer
                self._forget(sid)
        if resp.code != Code.OK:
            raise RpcError(resp.code, resp.message, p.method, resp.details)
        return resp.payload

    async def call(
        self, service: ServiceLike, method: str, request: Any, *,
        timeout: float | None = None, metadata: Metadata | None = None,
    ) -> Any:
        """One unary call with protobuf messages; returns the decoded response.

        Raises RpcError (see call_raw); UNIMPLEMENTED locally if `service` has no such method.
        """
        spec = service.methods.get(method)
        if spec is None:
            raise RpcError(Code.UNIMPLEMENTED, "no such method in the service", f"/{service.name}/{method}")
        payload = await self.call_raw(
            service.name, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        resp = spec.response_type()
        try:
            resp.ParseFromString(payload)
        except Exception as e:  # protobuf's DecodeError and friends
            raise RpcError(Code.DATA_LOSS, f"undecodable response: {e}", f"/{service.name}/{method}") from None
        return resp

    def stream(
        self, service: ServiceLike, method: str, request: Any = None, *,
        timeout: float | None = None, metadata: Metadata | None = None,
    ) -> ClientStream:
        """Open a streaming call (client, server or bidirectional, as the method declares).

        For server streaming pass `request`; for client streaming send with `send()` and finish
        with `close_send()`; iterate the stream for the server's messages and await `response()`.
        """
        spec = service.methods[method]
        payload = b"" if request is None or spec.client_streaming else request.SerializeToString()
        timeout = self.default_timeout if timeout is None else timeout
        sid, p = self._open(
            service.name, method, payload, timeout, metadata,
            client_streaming=spec.client_streaming, server_streaming=spec.server_streaming,
        )
        if spec.client_streaming and request is not None:
            self._p.write(self._p.conn.send_data(sid, request.SerializeToString()))
        return ClientStream(self, sid, p, spec, timeout)


class ClientStream:
    """One streaming call. Iterate it for the server's messages."""

    def __init__(self, client: Client, sid: int, pending: _Pending, spec: Any, timeout: float | None) -> None:
        self._client = client
        self._sid = sid
        self._p = pending
        self._spec = spec
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout

    async def _within_deadline(self, aw: Any) -> Any:
        try:
            async with asyncio.timeout_at(self._deadline):
                return await aw
        except TimeoutError:
            self.cancel()
            raise RpcError(Code.DEADLINE_EXCEEDED, "stream deadline passed", self._p.method) from None

    async def send(self, message: Any) -> None:
        """Send one message to the server. Raises RpcError if the call has already ended."""
        try:
            wire = self._client._p.conn.send_data(self._sid, message.SerializeToString())
        except LocalProtocolError as e:
            raise RpcError(Code.FAILED_PRECONDITION, str(e), self._p.method) from None
        self._client._p.write(wire)
        await self._within_deadline(self._client._p.drain())

    async def close_send(self) -> None:
        """Tell the server no more messages follow."""
        with contextlib.suppress(LocalProtocolError):
            self._client._p.write(self._client._p.conn.send_data(self._sid, b"", end_stream=True))

    async def recv(self) -> Any:
        """The next message from the server, or None when the server finished its side.
        Raises RpcError when the call failed."""
        assert self._p.queue is not None
        item = await self._within_deadline(self._p.queue.get())
        if isinstance(item, RpcError):
            self._p.queue.put_nowait(item)  # every later recv() fails the same way
            raise item
        if isinstance(item, bytes):
            self._p.buffered -= len(item)
        if item is _END:
            self._p.queue.put_nowait(_END)  # stay at the end for later recv() calls
            if self._p.response.done():
                self._check(self._p.response.result())
            return None
        msg = self._spec.response_type()
        try:
            msg.ParseFromString(item)
        except Exception as e:  # protobuf's DecodeError and friends
            raise RpcError(Code.DATA_LOSS, f"undecodable stream message: {e}", self._p.method) from None
        return msg

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Any]:
        while (msg := await self.recv()) is not None:
            yield msg

    async def response(self) -> Any:
        """Wait for the final response; returns the decoded message (client streaming) or None."""
        resp = await self._within_deadline(asyncio.shield(self._p.response))
        self._check(resp)
        if not resp.payload:
            return None
        msg = self._spec.response_type()
        try:
            msg.ParseFromString(resp.payload)
        except Exception as e:  # protobuf's DecodeError and friends
            raise RpcError(Code.DATA_LOSS, f"undecodable response: {e}", self._p.method) from None
        return msg

    def _check(self, resp: ResponseReceived) -> None:
        if resp.code != Code.OK:
            raise RpcError(resp.code, resp.message, self._p.method, resp.details)

    def cancel(self) -> None:
        """Stop waiting for this call; anything the server still sends is dropped."""
        self._client._forget(self._sid)


class Stub:
    """Attribute-style calls: `await stub.State(req, timeout=5)`."""

    def __init__(self, client: Client, service: ServiceLike) -> None:
        self._client = client
        self._service = service

    def __getattr__(self, method: str) -> Any:
        if method not in self._service.methods:
            raise AttributeError(f"{self._service.name} has no method {method}")
        spec = self._service.methods[method]
        if spec.client_streaming or spec.server_streaming:
            def open_stream(request: Any = None, **kw: Any) -> ClientStream:
                return self._client.stream(self._service, method, request, **kw)
            return open_stream

        async def unary(request: Any, **kw: Any) -> Any:
            return await self._client.call(self._service, method, request, **kw)
        return unary


async def connect_unix(path: str, *, timeout: float | None = 5.0, default_timeout: float | None = None,
                       max_message_size: int = MAX_MESSAGE_SIZE, max_stream_buffer: int = MAX_STREAM_BUFFER,
                       session: bool = False, flush: int = 0) -> Client:
    """Connect to a ttrpc server on a unix socket. Raises OSError (e.g. FileNotFoundError,
    ConnectionRefusedError) or TimeoutError.

    `session`: the peer is an agent behind a virtio-serial port (QEMU's chardev socket), which has no
    connection boundary of its own: open a session with a hello and take answers only after its echo
    (pykata.ttrpc.session). Calls fail with ConnectionClosedError whose message says why when the
    agent predates sessions or never echoes. `flush` (with `session`): write that many flush bytes
    before the hello (pykata.ttrpc.session.flush_bytes: FLUSH_SIZE completes any frame), for a host
    that got no echo on its last connection (a host before it may have left half a frame in the port,
    which took that hello as its data)."""
    loop = asyncio.get_running_loop()
    path = path.removeprefix("unix://")
    async with asyncio.timeout(timeout):
        _, proto = await loop.create_unix_connection(
            lambda: _ClientProtocol(max_message_size=max_message_size, max_stream_buffer=max_stream_buffer,
                                    session=session, flush=flush), path)
    return Client(proto, default_timeout=default_timeout)


async def connect_fd(fd: int, *, default_timeout: float | None = None, max_message_size: int = MAX_MESSAGE_SIZE,
                     max_stream_buffer: int = MAX_STREAM_BUFFER, session: bool = False,
                     flush: int = 0) -> Client:
    """A client over an already connected descriptor (socket or character device); it is dup'ed.
    `session` and `flush` as for connect_unix."""
    proto = _ClientProtocol(max_message_size=max_message_size, max_stream_buffer=max_stream_buffer,
                            session=session, flush=flush)
    await attach_fd(fd, proto)
    return Client(proto, default_timeout=default_timeout)
