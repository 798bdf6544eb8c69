"""Processes in a sandbox as the SDK hands them out: results, background handles, terminals.

A process's output waits in the agent (bounded: a process that prints faster than it is read is slowed
down, nothing is dropped) until it is read, so a background process can be attached to later: iterate
its handle whenever you like. Two pump tasks per process move output into a small bounded queue; they
only run while there is room, and leaving an `async for` early never loses a chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as _signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pykata.errors import PykataError
from pykata.sandbox import Process
from pykata.sdk.errors import SandboxTimeoutError, SdkError

StreamName = Literal["stdout", "stderr"]
# chunks waiting per process; each is at most 1 MiB (the agent's read cap)
QUEUE_CHUNKS = 8


@dataclass(frozen=True)
class ExecResult:
    """What a finished command did. `exit_code` is 128 + N when it was killed by signal N."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")


class AsyncStdin:
    """The standard input of a spawned process (opened with `stdin=True`)."""

    def __init__(self, proc: Process, guard: Callable[[], contextlib.AbstractAsyncContextManager[None]]) -> None:
        self._proc = proc
        self._guard = guard
        self.closed = False

    async def write(self, data: bytes | str) -> None:
        """Write all of `data` (str is UTF-8 encoded). Raises SdkError once closed or the process is gone."""
        if self.closed:
            raise PykataError("stdin is closed")
        async with self._guard():
            await self._proc.write_stdin(data.encode() if isinstance(data, str) else bytes(data))

    async def close(self) -> None:
        """Send end of file. Idempotent."""
        if self.closed:
            return
        self.closed = True
        async with self._guard():
            await self._proc.close_stdin()


class AsyncProcess:
    """A process started by `spawn` (or `pty`). `async for stream, chunk in proc` yields its output as it
    comes ("stdout"/"stderr", bytes); `await proc.wait()` its exit status; `await proc.result()` both."""

    def __init__(self, proc: Process, cmd: Sequence[str], sandbox_id: str,
                 guard: Callable[[], contextlib.AbstractAsyncContextManager[None]]) -> None:
        self._proc = proc
        self._guard = guard
        self.cmd = list(cmd)
        self.sandbox_id = sandbox_id
        self.stdin = AsyncStdin(proc, guard)
        self.exit_code: int | None = None
        # unbounded queue, bounded by `_room`: an end marker must always fit
        self._queue: asyncio.Queue[tuple[StreamName, bytes] | None] = asyncio.Queue()
        self._room = asyncio.Semaphore(QUEUE_CHUNKS)
        self._pumps: list[asyncio.Task[None]] = []
        self._error: BaseException | None = None
        self._ended = 0  # streams whose end was taken from the queue
        self._reading = asyncio.Lock()
        # one WaitProcess in flight per process, so `running` and processes() know when it ended
        self._waiter = asyncio.ensure_future(proc.wait())
        self._waiter.add_done_callback(self._exited)

    def _exited(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.exit_code = fut.result()

    @property
    def pid(self) -> int:
        """The process id inside the guest (the container's pid namespace is the VM's)."""
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.exit_code is None

    async def wait(self, timeout: float | None = None) -> int:
        """The exit status. Raises SandboxTimeoutError after `timeout` seconds (the process keeps running)."""
        async with self._guard():
            try:
                self.exit_code = await asyncio.wait_for(self._proc.wait(), timeout)
            except TimeoutError:
                raise SandboxTimeoutError(f"{self.cmd} still runs after {timeout}s",
                                          sandbox_id=self.sandbox_id) from None
        return self.exit_code

    async def kill(self, signal: int = _signal.SIGKILL) -> None:
        """Send `signal` (default SIGKILL). A process that already ended is left alone."""
        if self.exit_code is not None:
            return
        async with self._guard():
            await self._proc.signal(signal)

    def output(self) -> AsyncGenerator[tuple[StreamName, bytes], None]:
        """("stdout" | "stderr", chunk) as the process prints, until both streams end. Leaving early
        keeps what was not read for the next call."""
        return self._output()

    def __aiter__(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        return self._output()

    async def _output(self) -> AsyncGenerator[tuple[StreamName, bytes], None]:
        async with self._reading:
            self._start_pumps()
            while self._ended < 2:
                item = await self._queue.get()
                if item is None:
                    self._ended += 1
                    continue
                self._room.release()
                yield item
            if self._error is not None:
                raise self._error

    async def result(self, timeout: float | None = None, *, max_output: int | None = None) -> ExecResult:
        """Read the rest of the output and wait for the exit. After `timeout` seconds the process is
        killed and SandboxTimeoutError raised (carrying the output so far); past `max_output` bytes of
        output it is killed and SdkError raised."""
        out: list[bytes] = []
        err: list[bytes] = []

        async def collect() -> int:
            total = 0
            async for stream, chunk in self._output():
                total += len(chunk)
                if max_output is not None and total > max_output:
                    with contextlib.suppress(PykataError):
                        await self.kill()
                    raise SdkError(f"{self.cmd} printed more than {max_output} bytes (killed)",
                                   sandbox_id=self.sandbox_id)
                (out if stream == "stdout" else err).append(chunk)
            return await self.wait()

        try:
            code = await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            with contextlib.suppress(PykataError):
                await self.kill()
            raise SandboxTimeoutError(f"{self.cmd} did not finish within {timeout}s (killed)",
                                      sandbox_id=self.sandbox_id, stdout=b"".join(out),
                                      stderr=b"".join(err)) from None
        return ExecResult(code, b"".join(out), b"".join(err))

    def _start_pumps(self) -> None:
        if self._pumps:
            return
        self._pumps = [asyncio.ensure_future(self._pump("stdout")), asyncio.ensure_future(self._pump("stderr"))]

    async def _pump(self, stream: StreamName) -> None:
        try:
            async with self._guard():
                async for chunk in self._proc.chunks(stream):
                    await self._room.acquire()
                    self._queue.put_nowait((stream, chunk))
        except PykataError as e:
            self._error = e
        finally:
            # the end marker reaches the reader even when the read failed or was cancelled
            self._queue.put_nowait(None)

    async def detach(self) -> None:
        """Stop the output pumps (the sandbox is closing)."""
        for t in [*self._pumps, self._waiter]:
            t.cancel()
        await asyncio.gather(*self._pumps, self._waiter, return_exceptions=True)
