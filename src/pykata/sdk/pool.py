"""A warm pool of sandboxes: started ahead of time, handed out once, refilled in the background.

    async with pykata.AsyncPool(size=4, image="busybox") as pool:
        async with await pool.acquire() as sb:      # a booted sandbox, all yours
            await sb.run("python3 -c 'print(1)'")

A sandbox leaves the pool for good when acquired: it is never given to anyone else, and closing it
destroys it. The pool keeps `size` sandboxes ready (at most `max_starting` booting at once); a failing
boot is retried with a growing pause, and `acquire` raises its error while nothing is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pykata.errors import PykataError
from pykata.sdk.core import AsyncSandbox
from pykata.sdk.errors import SandboxGoneError, SandboxTimeoutError, SdkError

log = logging.getLogger("pykata.sdk")

MAX_SIZE = 64
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
# After an acquire, the replacement boots this much later while other sandboxes are still ready: its
# start-up (on this event loop and the host's CPUs) would otherwise delay the acquirer's first commands.
REFILL_DELAY = 0.5


class AsyncPool:
    """`size` sandboxes made with `AsyncSandbox(image, **sandbox_options)`, ready to hand out.

    `timeout` in the options starts counting when a sandbox is acquired, not while it waits. Waiting
    sandboxes keep running (an idle guest costs the host ~0.3 millicores), so `acquire` hands one over
    without resuming a VM; with `pause_idle` they are paused: no CPU at all, but ~20 ms more per acquire
    (QEMU's `cont` and the guest clock reset)."""

    def __init__(self, size: int = 2, image: str = "busybox", *, max_starting: int = 2, pause_idle: bool = False,
                 **sandbox_options: Any) -> None:
        if not 0 < size <= MAX_SIZE:
            raise SdkError(f"size: {size} is not between 1 and {MAX_SIZE}")
        if max_starting < 1:
            raise SdkError(f"max_starting: {max_starting} must be at least 1")
        self.size = size
        self.image = image
        self.max_starting = max_starting
        self.pause_idle = pause_idle
        self._lifetime: float | None = sandbox_options.pop("timeout", None)
        self._options = sandbox_options
        self._make: Callable[[], AsyncSandbox] = lambda: AsyncSandbox(image, **self._options)
        self._ready: asyncio.Queue[AsyncSandbox] = asyncio.Queue()
        self._starting = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._filler: asyncio.Task[None] | None = None
        self._boots: set[asyncio.Task[None]] = set()
        self._closed = False
        self._taken_at = 0.0
        self.last_error: BaseException | None = None

    @property
    def ready(self) -> int:
        """Sandboxes booted and waiting."""
        return self._ready.qsize()

    async def start(self) -> AsyncPool:
        """Begin filling (returns at once; `wait_ready` waits)."""
        if self._closed:
            raise SandboxGoneError("the pool is closed")
        if self._filler is None:
            self._filler = asyncio.ensure_future(self._fill())
        return self

    async def wait_ready(self, count: int | None = None, timeout: float | None = None) -> None:
        """Wait until `count` (default: size) sandboxes are ready. Raises SandboxTimeoutError, or the
        last boot error when boots fail with none in flight (as `acquire` does: never waits forever)."""
        want = min(self.size, count or self.size)
        await self.start()

        async def until() -> None:
            while self._ready.qsize() < want:
                if self.last_error is not None and self._starting == 0:
                    raise SdkError(f"pool: {self._ready.qsize()} of {want} sandboxes ready; starting one "
                                   f"failed: {self.last_error}") from self.last_error
                await self._wait_change()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise SandboxTimeoutError(f"pool: {self._ready.qsize()} of {want} sandboxes ready after {timeout}s "
                                      f"(last error: {self.last_error})") from None

    async def acquire(self, timeout: float | None = None) -> AsyncSandbox:
        """A started sandbox that is now yours (close it when done). Waits for one when none is ready.
        Raises SandboxTimeoutError, the last boot error when boots fail and none is ready,
        SandboxGoneError once the pool is closed."""
        await self.start()

        async def take() -> AsyncSandbox:
            while True:
                if self._closed:
                    raise SandboxGoneError("the pool is closed")
                with contextlib.suppress(asyncio.QueueEmpty):
                    sb = self._ready.get_nowait()
                    self._taken_at = time.monotonic()
                    self._notify()
                    return sb
                if self.last_error is not None and self._starting == 0:
                    raise SdkError(f"pool: no sandbox could be started: {self.last_error}") from self.last_error
                await self._wait_change()

        try:
            sb = await asyncio.wait_for(take(), timeout)
        except TimeoutError:
            raise SandboxTimeoutError(f"pool: no sandbox ready within {timeout}s") from None
        try:
            if sb.paused:
                await sb.resume()
            if self._lifetime is not None:
                await sb.set_timeout(self._lifetime)
        except BaseException:
            await sb.close()
            raise
        return sb

    def _notify(self) -> None:
        """Wake everyone waiting for a change (a sandbox ready or taken, a boot ended, closing)."""
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()

    async def _wait_change(self) -> None:
        f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(f)
        try:
            await f
        finally:
            self._waiters.discard(f)

    async def _fill(self) -> None:
        pause = RETRY_FIRST
        while not self._closed:
            wait = self._taken_at + REFILL_DELAY - time.monotonic()
            if wait > 0 and self._ready.qsize() > 0:
                await asyncio.sleep(wait)
                continue
            while not self._closed and self._ready.qsize() + self._starting < self.size \
                    and self._starting < self.max_starting:
                self._starting += 1
                boot = asyncio.ensure_future(self._boot())
                self._boots.add(boot)
                boot.add_done_callback(self._boots.discard)
            await self._wait_change()
            if self.last_error is not None and self._ready.qsize() == 0:
                await asyncio.sleep(pause)  # boots fail: do not spin
                pause = min(pause * 2, RETRY_MAX)
            else:
                pause = RETRY_FIRST

    async def _boot(self) -> None:
        sb = self._make()
        try:
            try:
                await sb.start()
                # the first command is spared the exec round trip (AsyncSandbox.prepare_command)
                await sb.prepare_command()
                if self.pause_idle:
                    await sb.pause()  # a paused VM uses no CPU at all
            except PykataError as e:
                log.warning("pool: starting a sandbox failed: %s", e)
                self.last_error = e
                await sb.close()
                return
            except BaseException:
                await sb.close()
                raise
            if self._closed:
                await sb.close()
                return
            self.last_error = None
            self._ready.put_nowait(sb)
        finally:
            # counted as starting until it is ready: else the filler would start one too many
            self._starting -= 1
            self._notify()

    async def close(self) -> None:
        """Stop filling and destroy the sandboxes still waiting (acquired ones are their owners')."""
        self._closed = True
        self._notify()
        tasks = [t for t in [self._filler, *self._boots] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        idle = []
        while not self._ready.empty():
            idle.append(self._ready.get_nowait())
        await asyncio.gather(*(sb.close() for sb in idle), return_exceptions=True)

    async def __aenter__(self) -> AsyncPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
