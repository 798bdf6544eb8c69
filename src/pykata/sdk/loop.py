"""One event loop thread shared by every blocking `Sandbox` of a process.

The blocking API runs the asyncio code on this loop. One thread serves any number of sandboxes (a
sandbox is a few sockets and child processes, not a thread); it starts with the first open sandbox and
ends, with its loop closed by the thread itself, when the last one closes.

A call from the caller's thread waits for its coroutine in slices, so Ctrl-C (KeyboardInterrupt) is
seen at once: the coroutine is then cancelled *and waited for*, so its cleanup (a VM being booted is
stopped, its directory removed) has run when the KeyboardInterrupt reaches the caller.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from pykata.errors import PykataError

T = TypeVar("T")

log = logging.getLogger("pykata.sdk")

# How long a cancelled call may take to clean up (a VM stop is bounded by the sandbox at 20 s).
CLEANUP_TIMEOUT = 60.0
# How long the thread may take to end its loop once the last sandbox closed.
STOP_TIMEOUT = 30.0
_POLL = 0.5


class LoopThreadGone(PykataError):
    """The SDK's event loop thread ended while a call was waiting for it."""


class SharedLoop:
    """Reference-counted event loop thread. `acquire()` before use, `release()` after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closers: dict[int, Callable[[], None]] = {}
        self._tokens = itertools.count(1)

    def acquire(self, closer: Callable[[], None] | None = None) -> int:
        """Start the thread if needed; return a token for `release`. `closer` runs at interpreter
        exit if the token was not released by then (a sandbox nobody closed)."""
        with self._lock:
            if self._thread is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_serve, args=(loop,), name="pykata-sdk-loop", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            self._users += 1
            token = next(self._tokens)
            if closer is not None:
                self._closers[token] = closer
            return token

    def set_closer(self, token: int, closer: Callable[[], None]) -> None:
        """What closes the user of `token` at interpreter exit."""
        with self._lock:
            self._closers[token] = closer

    def release(self, token: int) -> None:
        """Drop one user; the last one ends the thread (and waits for it, except from the thread itself)."""
        with self._lock:
            self._closers.pop(token, None)
            self._users -= 1
            if self._users > 0 or self._thread is None or self._loop is None:
                return
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():  # never close a loop that still runs: the thread closes it when it can
                log.warning("pykata SDK loop thread did not end within %.0fs", STOP_TIMEOUT)

    def run(self, aw: Awaitable[T]) -> T:
        """Run `aw` (a coroutine, or the next step of an async generator) on the loop and return its
        result (or raise its exception).

        KeyboardInterrupt (or any exception raised in the caller's thread while waiting) cancels the
        coroutine and waits up to CLEANUP_TIMEOUT for it to unwind before it is re-raised.
        Raises LoopThreadGone if the loop thread is not running.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            if isinstance(aw, Coroutine):
                aw.close()
            raise LoopThreadGone("the sandbox is not started or closed (no event loop runs for it): use "
                                 "`with pykata.Sandbox(...) as sb:` or `sb = pykata.Sandbox(...).start()`")
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(_awaited(aw))
            tasks.append(task)
            task.add_done_callback(lambda t: _copy_outcome(t, done))

        def cancel() -> None:
            for t in tasks:
                t.cancel()

        loop.call_soon_threadsafe(start)
        try:
            _wait(done, thread, None)
        except BaseException:
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing to cancel
                loop.call_soon_threadsafe(cancel)
            _wait_for_cleanup(done, thread)
            raise
        return done.result()

    def close_all(self) -> None:
        """Close what nobody closed (at interpreter exit)."""
        with self._lock:
            closers = list(self._closers.values())
        for close in closers:
            try:
                close()
            except Exception as e:  # exit must go on for the others
                log.warning("pykata SDK: closing a sandbox at exit: %s", e)


async def _awaited(aw: Awaitable[T]) -> T:
    return await aw


def _copy_outcome(task: asyncio.Task[T], done: concurrent.futures.Future[T]) -> None:
    if task.cancelled():
        done.cancel()
    elif (exc := task.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


def _wait(done: concurrent.futures.Future[Any], thread: threading.Thread, deadline: float | None) -> None:
    # In slices: a dead loop thread is noticed instead of waiting forever.
    while not done.done():
        concurrent.futures.wait([done], timeout=_POLL)
        if not done.done() and not thread.is_alive():
            raise LoopThreadGone("the SDK's event loop thread ended during a call")
        if deadline is not None and time.monotonic() > deadline:
            return


def _wait_for_cleanup(done: concurrent.futures.Future[Any], thread: threading.Thread) -> None:
    deadline = time.monotonic() + CLEANUP_TIMEOUT
    while not done.done() and time.monotonic() < deadline:
        try:
            _wait(done, thread, deadline)
        except KeyboardInterrupt:
            continue  # a second Ctrl-C: the cleanup is bounded; leaving a VM behind would be worse
        except LoopThreadGone:
            return
    if not done.done():
        log.warning("pykata SDK: a cancelled call did not unwind within %.0fs", CLEANUP_TIMEOUT)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), STOP_TIMEOUT))
        except Exception as e:
            log.warning("pykata SDK loop shutdown: %s", e)
        finally:
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    pending = asyncio.all_tasks(loop)
    if not pending:
        return
    for t in pending:
        t.cancel()
    loop.run_until_complete(asyncio.wait(pending, timeout=STOP_TIMEOUT))


SHARED = SharedLoop()
atexit.register(SHARED.close_all)
