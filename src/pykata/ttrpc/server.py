"""asyncio ttrpc server: services registered from their specs, requests dispatched concurrently.

Handlers are objects with one async method per RPC, named as in the .proto:

    class Task:
        async def State(self, request, ctx): return StateResponse(...)            # unary
        async def Logs(self, request, ctx): yield LogLine(...)                     # server streaming
        async def Upload(self, requests, ctx): async for r in requests: ...        # client streaming
        def Ping(self, request, ctx): return PingResponse(...)                     # unary, answered at once

A unary handler that is a plain function (`def`, it never awaits) is answered in the loop turn that
read its request, with no task and no deadline timer: its deadline could not cut it short anyway,
and a task would only delay it to the next turn. A plain function may instead hand back an awaitable
(a wrapper whose target must load first): that is awaited in a task under the call's deadline, as an
`async def` handler's call is.
(The agent's Health service: under TCG a VM template's clone translates every guest instruction
afresh, and its first answer, hello + Check + Version, ran ~9% fewer translated blocks without them.)

Bounds (a peer may be hostile): each frame is at most `max_message_size` both ways; a request that
announces data frames for a method that takes none is refused (INVALID_ARGUMENT), and data on a
unary call closes the connection (a protocol error); a stream's unread inbound messages are capped
at `max_inbound_bytes` (past it the server stops reading the connection until the handler catches
up); requests in flight per connection are capped in number and in bytes (RESOURCE_EXHAUSTED).

Errors become google.rpc statuses: a PykataError answers its `rpc_code` (pykata.errors: `NotFound`
is NOT_FOUND, ...; a handler that passes on a status it got uses `pykata.errors.error_for`),
NotImplementedError is UNIMPLEMENTED, anything else is UNKNOWN (and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from pykata.errors import PykataError
from pykata.ttrpc.codes import Code
from pykata.ttrpc.connection import DataReceived, Event, HelloReceived, RequestReceived, Role
from pykata.ttrpc.errors import LocalProtocolError, RemoteProtocolError
from pykata.ttrpc.frames import MAX_MESSAGE_SIZE
from pykata.ttrpc.service import ServiceLike
from pykata.ttrpc.session import echo_frame
from pykata.ttrpc.stats import RpcStats
from pykata.ttrpc.transport import ConnectionProtocol, FdWriter, attach_fd

log = logging.getLogger("pykata.ttrpc.server")

MAX_INFLIGHT_PER_CONNECTION = 4096
# Request payloads held by handlers still running, per connection.
MAX_INFLIGHT_BYTES = 64 << 20
# Unread data of one client-streaming call before the server stops reading the connection.
MAX_INBOUND_BYTES = 8 << 20


class CallContext:
    """What a handler knows about its call."""

    __slots__ = ("metadata", "method", "peer", "service", "session", "timeout")

    def __init__(self, service: str, method: str, metadata: dict[str, list[str]], timeout: float | None,
                 peer: ConnectionProtocol, session: int = 0) -> None:
        self.service = service
        self.method = method
        self.metadata = metadata
        # seconds the client allows, or None
        self.timeout = timeout
        self.peer = peer
        # the host session the call came in (pykata.ttrpc.session): its answer is written only in that one
        self.session = session

    def __repr__(self) -> str:
        return (f"CallContext(service={self.service!r}, method={self.method!r}, metadata={self.metadata!r}, "
                f"timeout={self.timeout!r}, session={self.session!r})")


class _Route:
    __slots__ = ("client_streaming", "fn", "inline", "request_type", "response_type", "server_streaming")

    def __init__(self, request_type: Any, response_type: Any, client_streaming: bool, server_streaming: bool,
                 fn: Callable[..., Any]) -> None:
        self.request_type = request_type
        self.response_type = response_type
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming
        self.fn = fn
        # a unary plain function: answered at once (see the module docstring)
        self.inline = not (client_streaming or server_streaming or asyncio.iscoroutinefunction(fn)
                           or inspect.isasyncgenfunction(fn))


class _Inbound:
    """The unread messages of one client-streaming call, with their size."""

    __slots__ = ("bytes", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.bytes = 0


class _ServerProtocol(ConnectionProtocol):
    def __init__(self, server: Server, *, resync: bool = False, sessions: bool = False,
                 on_first_data: Callable[[], None] | None = None) -> None:
        super().__init__(Role.SERVER, max_message_size=server.max_message_size)
        self.server = server
        self.resync = resync
        # host sessions on one byte stream (pykata.ttrpc.session): a hello frame starts a new one
        self.sessions = sessions
        self.conn.sessions = sessions
        self.session = 0
        # whether `on_first_data` ran for bytes no hello has followed yet (the hello that comes next
        # opens the session it ran for; any later hello opens another and runs it again)
        self._hook_fresh = False
        self._on_first_data = on_first_data
        # whether the peer sent any bytes (serve_fd's answer)
        self.received = False
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.inbound: dict[int, _Inbound] = {}
        self.inflight_bytes: dict[int, int] = {}
        self._write_paused = False
        self._full_streams: set[int] = set()

    def handle_protocol_error(self, error: RemoteProtocolError) -> bool:
        return self.resync

    def data_received(self, data: bytes | memoryview) -> None:
        if not self.received:
            self.received = True
            if self._on_first_data is not None:
                self._on_first_data()
                self._hook_fresh = True
        super().data_received(data)

    def _new_session(self, nonce: bytes) -> None:
        """A host's hello: whatever the earlier session asked is abandoned, its answers are never
        written (the calls are cancelled, and any late write is dropped by its `session`), the
        protocol state starts fresh, and the echo goes out before any answer of the new session."""
        if not self._hook_fresh and self._on_first_data is not None:
            self._on_first_data()  # a new host session with no end of stream before it
        self._hook_fresh = False
        self.session += 1
        old_tasks, old_inbound = self.tasks, self.inbound
        self.tasks, self.inbound, self.inflight_bytes = {}, {}, {}
        self._full_streams = set()
        for t in old_tasks.values():
            t.cancel()
        for box in old_inbound.values():
            box.queue.put_nowait(None)
        self.conn.new_session()
        if isinstance(self._writer, FdWriter):
            self._writer.discard_pending()  # unsent bytes of old answers (maybe half a frame)
        with contextlib.suppress(ConnectionResetError):
            self.write(echo_frame(nonce))
        self._update_reading()

    # While our answers cannot be written, stop reading new requests: the client then feels the
    # back-pressure instead of the server queueing handlers (and answers) without bound. Same while
    # a handler has not read a stream's inbound data. Only the server does this; the client always
    # reads, so the two sides can never wait on each other.
    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        t = self._transport
        if not isinstance(t, asyncio.ReadTransport) or t.is_closing():
            return
        stop = self._write_paused or bool(self._full_streams)
        if stop and t.is_reading():
            t.pause_reading()
        elif not stop and not t.is_reading():
            t.resume_reading()

    def handle_event(self, event: Event) -> None:
        if isinstance(event, HelloReceived):
            self._new_session(event.nonce)
            return
        self._hook_fresh = False
        if isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, DataReceived):
            box = self.inbound.get(event.stream_id)
            if box is None:
                return
            if event.payload or not event.end_stream:
                box.queue.put_nowait(event.payload)
                box.bytes += len(event.payload)
                if box.bytes > self.server.max_inbound_bytes:
                    self._full_streams.add(event.stream_id)
                    self._update_reading()
            if event.end_stream:
                box.queue.put_nowait(None)

    def _request(self, ev: RequestReceived) -> None:
        sid = ev.stream_id
        full = f"/{ev.service}/{ev.method}"
        route = self.server._routes.get((ev.service, ev.method))
        if route is None:
            known = any(s == ev.service for s, _ in self.server._routes)
            self._reply_error(sid, Code.UNIMPLEMENTED, f"{full}: {'method' if known else 'service'} not implemented")
            return
        if ev.remote_open and not route.client_streaming:
            # Answered now, so the stream is closed before any of its data could be queued.
            self._reply_error(sid, Code.INVALID_ARGUMENT, f"{full}: not a client-streaming method: no data frames")
            return
        if len(self.tasks) >= MAX_INFLIGHT_PER_CONNECTION:
            self._reply_error(sid, Code.RESOURCE_EXHAUSTED, "too many concurrent requests")
            return
        held = sum(self.inflight_bytes.values())
        if held + len(ev.payload) > self.server.max_inflight_bytes:
            self._reply_error(sid, Code.RESOURCE_EXHAUSTED,
                              f"{full}: requests in flight already hold {held} bytes")
            return
        if route.inline:
            later = self.server._answer_now(self, ev, route, full)
            if later is None:
                return
            self.inflight_bytes[sid] = len(ev.payload)  # held by the awaitable the handler handed back
            task = asyncio.get_running_loop().create_task(later)
        else:
            self.inflight_bytes[sid] = len(ev.payload)
            if ev.remote_open:
                self.inbound[sid] = _Inbound()
            task = asyncio.get_running_loop().create_task(self.server._dispatch(self, ev, route))
        self.tasks[sid] = task
        task.add_done_callback(functools.partial(self._done, self.session, sid))

    def consumed(self, sid: int, n: int) -> None:
        """A handler took `n` bytes off stream `sid`'s inbound queue."""
        box = self.inbound.get(sid)
        if box is not None:
            box.bytes -= n
            if box.bytes <= self.server.max_inbound_bytes and sid in self._full_streams:
                self._full_streams.discard(sid)
                self._update_reading()

    def _done(self, session: int, sid: int, _task: object = None) -> None:
        if session != self.session:
            return  # the call of an earlier host session: its state went with that session
        self.tasks.pop(sid, None)
        self.inbound.pop(sid, None)
        self.inflight_bytes.pop(sid, None)
        if sid in self._full_streams:
            self._full_streams.discard(sid)
            self._update_reading()

    def _reply_error(self, sid: int, code: Code, message: str, session: int | None = None) -> None:
        if session is not None and session != self.session:
            return
        with contextlib.suppress(ConnectionResetError):
            self.write(self.conn.send_response(sid, code=code, message=message))

    def on_closed(self, exc: BaseException | None) -> None:
        for t in list(self.tasks.values()):
            t.cancel()
        for box in self.inbound.values():
            box.queue.put_nowait(None)
        self.server._connections.discard(self)


def _status_of(exc: BaseException) -> tuple[Code, str]:
    """The one place an exception becomes a status: a PykataError answers its `rpc_code`."""
    if isinstance(exc, PykataError):  # an RpcError (a call the handler made failed) is UNKNOWN here
        return Code.from_wire(int(exc.rpc_code)), str(exc)
    if isinstance(exc, NotImplementedError):
        return Code.UNIMPLEMENTED, str(exc) or "not implemented"
    return Code.UNKNOWN, str(exc) or type(exc).__name__


class Server:
    """A ttrpc server. Register services, then serve on unix sockets or descriptors.

    `max_message_size` caps each frame both ways; `max_inbound_bytes` the unread data of one
    client-streaming call; `max_inflight_bytes` the request payloads held by running handlers of one
    connection (see the module docstring)."""

    def __init__(self, *, max_message_size: int = MAX_MESSAGE_SIZE, max_inbound_bytes: int = MAX_INBOUND_BYTES,
                 max_inflight_bytes: int = MAX_INFLIGHT_BYTES, stats: RpcStats | None = None,
                 sessions: bool = False) -> None:
        """`stats`: count each call's method, status and wall time there. `sessions`: every connection
        understands a host's session hello (pykata.ttrpc.session; the agent's server)."""
        self.stats = stats
        self.sessions = sessions
        self.max_message_size = max_message_size
        self.max_inbound_bytes = max_inbound_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self._routes: dict[tuple[str, str], _Route] = {}
        self._connections: set[_ServerProtocol] = set()
        self._listeners: list[asyncio.AbstractServer] = []

    def register(self, service: ServiceLike, handler: object) -> None:
        """Route every method of `service` to the same-named attribute of `handler`.

        Raises TypeError if the handler lacks a method (fail at start-up, not at the first call).
        """
        missing = [m for m in service.methods if not callable(getattr(handler, m, None))]
        if missing:
            raise TypeError(f"{type(handler).__name__} lacks {service.name} methods: {', '.join(missing)}")
        for name, spec in service.methods.items():
            self._routes[(service.name, name)] = _Route(
                spec.request_type, spec.response_type, spec.client_streaming, spec.server_streaming,
                getattr(handler, name),
            )

    # -- serving -----------------------------------------------------------------------------------

    async def serve_unix(self, path: str, *, mode: int = 0o600) -> asyncio.AbstractServer:
        """Listen on a unix socket (an old socket file at `path` is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv = await asyncio.get_running_loop().create_unix_server(self._new_protocol, path)
        os.chmod(path, mode)
        self._listeners.append(srv)
        return srv

    async def serve_socket(self, sock: socket.socket, *,
                           on_first_data: Callable[[], None] | None = None) -> asyncio.AbstractServer:
        """Listen on an already bound and listening socket (e.g. vsock).

        `on_first_data` is called with each connection's first bytes, before any of them is
        parsed (see serve_fd)."""
        srv = await asyncio.get_running_loop().create_server(
            functools.partial(self._new_protocol, on_first_data=on_first_data), sock=sock)
        self._listeners.append(srv)
        return srv

    def _new_protocol(self, on_first_data: Callable[[], None] | None = None) -> _ServerProtocol:
        p = _ServerProtocol(self, sessions=self.sessions, on_first_data=on_first_data)
        self._connections.add(p)
        return p

    async def serve_fd(self, fd: int, *, resync: bool = True, sessions: bool | None = None,
                       on_first_data: Callable[[], None] | None = None,
                       peer_present: Callable[[], bool] | None = None) -> bool:
        """Serve one peer on a connected descriptor until end of stream or until the server is
        closed; return whether the peer sent anything. With `resync`, garbage from the peer is
        skipped instead of ending the connection (byte streams with no reconnect signal, such as a
        virtio-serial port). `fd` stays open (it is duplicated), and may be served again.

        `on_first_data` is called once, synchronously, when the first bytes arrive and before any
        of them is parsed, so it runs before the peer's first request is handled (the agent
        reseeds the guest's CRNG there). It must not raise. With `sessions` it runs again at a hello
        that follows bytes of an earlier session (a new host session without an end of stream).

        With `sessions` (default: the server's), a host's session hello (pykata.ttrpc.session) where
        a frame begins ends the calls of the session before it and is echoed (a byte stream whose
        peers come and go without the reader seeing an end: a virtio-serial port).

        `peer_present` (a character device whose peer comes and goes): asked before an end of file is
        believed (FdReader._confirm_eof). Without it a guest that read a new host's first bytes before
        its kernel knew that host had connected took the stale end of file after them for the end of
        the session, and the new host's hello went with it: its echo never came."""
        proto = _ServerProtocol(self, resync=resync, sessions=self.sessions if sessions is None else sessions,
                                on_first_data=on_first_data)
        self._connections.add(proto)
        await attach_fd(fd, proto, peer_present=peer_present)
        try:
            await asyncio.shield(proto.closed)
        finally:
            proto.abort(None)
        return proto.received

    async def close(self, *, grace: float = 0.0) -> None:
        """Stop listening and end every connection; in-flight handlers are cancelled. Idempotent.

        With `grace` (seconds), connections already open may go on for up to that long (their
        clients' calls in flight, and calls they still send, are answered) and end sooner when their
        peers close them: a client between two calls of one operation gets its answer."""
        for srv in self._listeners:
            srv.close()
        open_ = [p.closed for p in self._connections if not p.closed.done()]
        if grace > 0 and open_:
            await asyncio.wait(open_, timeout=grace)
        for p in list(self._connections):
            p.abort(None)
        for srv in self._listeners:
            await srv.wait_closed()
        self._listeners.clear()

    # -- dispatch ----------------------------------------------------------------------------------

    async def _dispatch(self, proto: _ServerProtocol, ev: RequestReceived, route: _Route) -> None:
        full = f"/{ev.service}/{ev.method}"
        timeout = ev.timeout_nano / 1e9 if ev.timeout_nano > 0 else None
        ctx = CallContext(ev.service, ev.method, ev.metadata, timeout, proto, proto.session)
        if self.stats is None:
            await self._call(proto, ev, route, ctx, full)
            return
        start = time.perf_counter()
        ok = False
        try:
            ok = await self._call(proto, ev, route, ctx, full)
        finally:
            self.stats.record(ev.method, time.perf_counter() - start, ok)

    async def _call(self, proto: _ServerProtocol, ev: RequestReceived, route: _Route, ctx: CallContext,
                    full: str) -> bool:
        """Run the handler and answer; True when it succeeded."""
        timeout = ctx.timeout
        try:
            async with asyncio.timeout(timeout):
                await self._run(proto, ev, route, ctx)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            proto._reply_error(ev.stream_id, *_failure(e, full), ctx.session)
        return False

    def _answer_now(self, proto: _ServerProtocol, ev: RequestReceived, route: _Route,
                    full: str) -> Coroutine[Any, Any, None] | None:
        """Run a unary plain-function handler and write its answer, in this loop turn (module docstring).
        A handler that handed back an awaitable instead (a wrapper whose target is not ready yet): the
        coroutine that awaits it under the call's deadline and answers, for the caller to run as a task."""
        ctx = CallContext(ev.service, ev.method, ev.metadata, ev.timeout_nano / 1e9 if ev.timeout_nano > 0 else None,
                          proto, proto.session)
        start = time.perf_counter() if self.stats is not None else 0.0
        ok = False
        try:
            result = route.fn(_decode(route.request_type, ev.payload), ctx)
            if getattr(result, "__await__", None) is not None:  # (not isinstance: an ABC check costs more)
                return self._answer_later(proto, ev, ctx, full, result, start)
            payload = _encode(result)
            ok = True
        except Exception as e:
            proto._reply_error(ev.stream_id, *_failure(e, full), ctx.session)
        else:
            with contextlib.suppress(ConnectionResetError):
                proto.write(proto.conn.send_response(ev.stream_id, payload))
        if self.stats is not None:
            self.stats.record(ev.method, time.perf_counter() - start, ok)
        return None

    async def _answer_later(self, proto: _ServerProtocol, ev: RequestReceived, ctx: CallContext, full: str,
                            pending: Awaitable[Any], start: float) -> None:
        """_answer_now's answer that a handler gave as an awaitable: awaited under the call's deadline."""
        ok = False
        try:
            async with asyncio.timeout(ctx.timeout):
                result = await pending
            payload = _encode(result)
            ok = True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            proto._reply_error(ev.stream_id, *_failure(e, full), ctx.session)
        else:
            if ctx.session == proto.session:  # else a newer host session began: this answer is nobody's
                with contextlib.suppress(ConnectionResetError):
                    proto.write(proto.conn.send_response(ev.stream_id, payload))
        finally:
            if self.stats is not None:
                self.stats.record(ev.method, time.perf_counter() - start, ok)

    async def _run(self, proto: _ServerProtocol, ev: RequestReceived, route: _Route, ctx: CallContext) -> None:
        sid = ev.stream_id
        if route.client_streaming:
            arg: Any = self._inbound_messages(proto, ev, route)
        else:
            arg = _decode(route.request_type, ev.payload)
        result = route.fn(arg, ctx)
        if route.server_streaming:
            if not isinstance(result, types.AsyncGeneratorType):
                raise TypeError(f"{ctx.method} must be an async generator (server streaming)")
            async for msg in result:
                if ctx.session != proto.session:
                    return
                proto.write(proto.conn.send_data(sid, _encode(msg)))
                await proto.drain()
            payload = b""
        else:
            payload = _encode(await result) if isinstance(result, Awaitable) else _encode(result)
        if ctx.session != proto.session:
            return  # a newer host session began: this answer is nobody's
        with contextlib.suppress(ConnectionResetError):
            # no drain here: reading pauses while writing is paused, which bounds the answers queued
            proto.write(proto.conn.send_response(sid, payload))

    async def _inbound_messages(
        self, proto: _ServerProtocol, ev: RequestReceived, route: _Route
    ) -> AsyncIterator[Any]:
        if ev.payload:
            yield _decode(route.request_type, ev.payload)
        box = proto.inbound.get(ev.stream_id)
        if box is None:
            return
        while (item := await box.queue.get()) is not None:
            proto.consumed(ev.stream_id, len(item))
            yield _decode(route.request_type, item)


class _BadPayload(Exception):
    pass


def _failure(exc: Exception, full: str) -> tuple[Code, str]:
    """The status a call `full` answers when its handler (or the request's decoding) raised `exc`."""
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED, f"{full}: deadline exceeded"
    if isinstance(exc, _BadPayload):
        return Code.INVALID_ARGUMENT, f"{full}: {exc}"
    if isinstance(exc, LocalProtocolError):
        return Code.RESOURCE_EXHAUSTED, f"{full}: {exc}"
    code, message = _status_of(exc)
    if code == Code.UNKNOWN and not isinstance(exc, PykataError):
        log.error("handler %s failed", full, exc_info=exc)
    return code, message


def _decode(cls: Any, payload: bytes) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except Exception as e:  # protobuf's DecodeError (and RuntimeWarning-free subclasses)
        raise _BadPayload(f"cannot decode {cls.DESCRIPTOR.full_name}: {e}") from None
    return msg


def _encode(msg: Any) -> bytes:
    data: bytes = msg.SerializeToString()
    return data

