"""One serialized QMP client per VM.

Every call into a VM's QMP socket goes through `QmpChannel.execute`: one at a time (an asyncio.Lock),
each with a deadline, and all of them fail at once when the channel is closed (the VM died or is being
stopped) instead of hanging. Kata's Cloud Hypervisor driver leaked pods when two concurrent shutdowns
interleaved their replies on one unguarded control socket; this class exists so that cannot happen here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message

from pykata import tracing
from pykata.errors import guest_text
from pykata.hypervisor.errors import QmpError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
# What an error quotes of QEMU's own words (an error reply's desc, a migration's error-desc, a
# SHUTDOWN's reason): QEMU runs the guest, so a guest that escapes into it writes them, up to qemu.qmp's
# 64 KiB line; they go into the errors containerd logs and hands to kubelet. QEMU's real ones are a line.
MAX_QEMU_TEXT = 500


def qemu_text(value: object) -> str:
    """`value`, written by QEMU, as an error may quote it: bounded and escaped (pykata.errors.guest_text)."""
    return guest_text(value if isinstance(value, str) else repr(value), MAX_QEMU_TEXT)
WATCHED_EVENTS = ("SHUTDOWN", "GUEST_PANICKED", "STOP", "RESUME", "RESET", "DEVICE_DELETED",
                  "POWERDOWN", "MIGRATION", "ACPI_DEVICE_OST", "VSERPORT_CHANGE")


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: Mapping[str, Any]
    timestamp: float


EventCallback = Callable[[QmpEvent], None]


class _Client(QMPClient):
    """qemu.qmp's client without its event buffers. Its default listener queues every event QEMU sends
    for a reader of `events` (there is none here), and each listener keeps a history of every event it
    accepted, both for the connection's life; a guest decides how many events QEMU sends (one
    BLOCK_IO_ERROR per write to a read-only disk, which QEMU does not throttle: thousands a second),
    so the process that owns the VM grew by ~1 KiB per event (tests/security/test_qmp_event_flood.py).
    Here each event goes to `deliver` as it is read, and nothing keeps it."""

    def __init__(self, name: str, deliver: Callable[[Message], None]) -> None:
        super().__init__(name)
        self._deliver = deliver

    async def _event_dispatch(self, msg: Message) -> None:
        self._deliver(msg)


class QmpListener:
    """Events of one channel that match a predicate, queued from the moment it is registered (so an
    event that follows a command cannot be missed). Made by `QmpChannel.listener`."""

    def __init__(self, channel: QmpChannel, predicate: Callable[[QmpEvent], bool]) -> None:
        self._channel = channel
        self._predicate = predicate
        self._queue: asyncio.Queue[QmpEvent] = asyncio.Queue()

    def _offer(self, event: QmpEvent) -> None:
        if self._predicate(event):
            self._queue.put_nowait(event)

    async def get(self, timeout: float) -> QmpEvent:
        """The next matching event.

        Raises:
            QmpError: none within `timeout`, or the channel is or gets closed first (the VM is gone).
        """
        if not self._queue.empty():
            return self._queue.get_nowait()
        event: QmpEvent = await self._channel._race(self._queue.get(), timeout, "event")
        return event


class QmpChannel:
    """A QMP connection to one VM, serialized and bounded.

    `on_event` is called (in the event loop, must not block) for every event in `WATCHED_EVENTS`.
    """

    def __init__(self, socket_path: Path, *, name: str, on_event: EventCallback | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self._path = socket_path
        self._client = _Client(name, self._dispatch)
        self._lock = asyncio.Lock()
        self._on_event = on_event
        self._default_timeout = default_timeout
        self._closed: asyncio.Future[QmpError] = asyncio.get_running_loop().create_future()
        self._connected = False
        self._listeners: list[QmpListener] = []

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def connect(self, timeout: float) -> None:
        """Connect, retrying while QEMU has not created the socket yet.

        Raises:
            QmpError: not connected within `timeout`, or the channel was closed meanwhile.
        """
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            self._raise_if_closed("connect")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError("connect", f"no QMP server at {self._path} after {timeout:.1f}s: {last}")
            if not self._path.exists():
                # QEMU creates the socket a few milliseconds after it starts; don't let qemu.qmp log
                # a failed connection for every early try.
                last = FileNotFoundError(str(self._path))
                await asyncio.sleep(0.005)
                continue
            try:
                await self._race(self._client.connect(str(self._path)), remaining, "connect")
                break
            except QmpError as exc:
                if self.closed:
                    raise
                last = exc
            except (QMPError, OSError) as exc:
                last = exc
            # The socket appears a few milliseconds after QEMU starts.
            await asyncio.sleep(0.01)
        self._connected = True

    @contextlib.contextmanager
    def listener(self, *names: str, where: Callable[[QmpEvent], bool] | None = None) -> Iterator[QmpListener]:
        """Queue the events named `names` (those in WATCHED_EVENTS) that satisfy `where` while the block
        runs, qemu.qmp's `listener` shape:

            with qmp.listener("DEVICE_DELETED", where=lambda e: e.data.get("device") == "blk1") as ev:
                await qmp.execute("device_del", {"id": "blk1"})
                await ev.get(timeout=5)
        """
        def matches(event: QmpEvent) -> bool:
            return (not names or event.name in names) and (where is None or where(event))

        listener = QmpListener(self, matches)
        self._listeners.append(listener)
        try:
            yield listener
        finally:
            self._listeners.remove(listener)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None, *,
                      timeout: float | None = None, fd: int | None = None) -> Any:
        """Run one QMP command after every earlier one finished; return its "return" value.

        `fd` is sent with SCM_RIGHTS just before the command, under the same lock (for `getfd`/`add-fd`).

        Raises:
            QmpError: QEMU answered with an error (`error_class` set), the call took longer than `timeout`
                (default 5 s, waiting for the lock included), or the channel is or gets closed.
        """
        self._raise_if_closed(command)
        limit = self._default_timeout if timeout is None else timeout
        if tracing.enabled():
            with tracing.span(f"qmp.{command}", client=True):
                return await self._race(self._locked(command, arguments, fd), limit, command)
        return await self._race(self._locked(command, arguments, fd), limit, command)

    async def _locked(self, command: str, arguments: Mapping[str, object] | None, fd: int | None) -> Any:
        async with self._lock:
            self._raise_if_closed(command)
            if not self._connected:
                raise QmpError(command, "not connected")
            try:
                if fd is not None:
                    self._client.send_fd_scm(fd)
                return await self._client.execute(command, arguments)
            except ExecuteError as exc:
                raise QmpError(command, qemu_text(exc.error.error.desc), qemu_text(exc.error.error.class_)) from None
            except (QMPError, OSError, EOFError) as exc:
                raise QmpError(command, f"connection failed: {qemu_text(repr(exc))}") from None

    async def _race(self, coro: Any, timeout: float, command: str) -> Any:
        """Await `coro`, but give up at `timeout` or as soon as the channel closes."""
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task, self._closed}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self._closed.done():
            raise QmpError(command, str(self._closed.result()).split(": ", 1)[-1])
        raise QmpError(command, f"no answer within {timeout:.1f}s")

    def _raise_if_closed(self, command: str) -> None:
        if self._closed.done():
            raise QmpError(command, str(self._closed.result()).split(": ", 1)[-1])

    def abort(self, reason: str) -> None:
        """Fail every pending and future call with `reason` (e.g. "VM exited with code -9"). Idempotent."""
        if not self._closed.done():
            self._closed.set_result(QmpError("abort", reason))

    async def close(self, reason: str = "channel closed") -> None:
        """Abort pending calls and disconnect (bounded). Idempotent."""
        self.abort(reason)
        with contextlib.suppress(Exception):
            # disconnect() waits for the reader/writer tasks; with QEMU gone that is immediate.
            await asyncio.wait_for(self._client.disconnect(), 2.0)

    def _dispatch(self, event: Message) -> None:
        """One event as QEMU sent it (in the client's reader task: must not block or raise): those of
        WATCHED_EVENTS go to the listeners and `on_event`, the others are dropped."""
        name = event.get("event")
        if name not in WATCHED_EVENTS:
            return
        data = event.get("data")
        ts = event.get("timestamp")
        try:
            stamp = 0.0
            if isinstance(ts, dict):
                stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        except (TypeError, ValueError):
            stamp = 0.0
        qmp_event = QmpEvent(str(name), data if isinstance(data, dict) else {}, stamp)
        for subscriber in list(self._listeners):
            subscriber._offer(qmp_event)
        if self._on_event is not None:
            try:
                self._on_event(qmp_event)
            except Exception:
                log.exception("QMP event callback failed for %s", name)
