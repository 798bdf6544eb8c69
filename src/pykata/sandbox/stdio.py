"""Moving a process's stdio between the agent and host files: output pumps, stdin feeding."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import BinaryIO

from pykata.errors import PykataError
from pykata.sandbox.process import Process, Stream

Sink = Callable[[bytes], None]
STDIN_CHUNK = 1 << 16


def file_sink(*files: BinaryIO) -> Sink:
    def write(data: bytes) -> None:
        for f in files:
            f.write(data)
            f.flush()
    return write


async def pump_output(proc: Process, stream: Stream, sink: Sink) -> None:
    """Copy one output stream to `sink` until end of stream."""
    async for chunk in proc.chunks(stream):
        sink(chunk)


async def feed_stdin(proc: Process, fd: int) -> None:
    """Copy host file descriptor `fd` to the process's stdin until EOF, then close its stdin.

    A tty, pipe or socket is read only when the loop says it is readable (`loop.add_reader`), so
    cancelling this task ends it at once: no thread stays blocked in read(2) (which would keep
    `asyncio.run` from returning until stdin reaches EOF). Regular files and /dev/null cannot be
    polled, and a read of them never waits, so they are read directly. `fd`'s flags are not touched:
    it is often the terminal shared with the parent shell.
    """
    loop = asyncio.get_running_loop()
    pollable = True
    while True:
        if pollable:
            try:
                await _readable(loop, fd)
            except PermissionError:  # epoll refuses regular files and /dev/null: they never block
                pollable = False
        try:
            data = os.read(fd, STDIN_CHUNK)
        except BlockingIOError:
            continue  # another reader of a shared fd took the data first
        except OSError:
            data = b""
        if not data:
            break
        try:
            await proc.write_stdin(data)
        except PykataError:
            break  # the process is gone, or its agent refused the data: end its stdin (best effort)
    with contextlib.suppress(PykataError):
        await proc.close_stdin()


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until `fd` has data or EOF. Raises PermissionError for fds epoll cannot watch."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
