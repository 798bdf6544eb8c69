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
    """Copy host file descriptor `fd` to the process's stdin until EOF, then close its stdin."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    reader_done = asyncio.Event()

    def read_blocking() -> None:
        try:
            while True:
                data = os.read(fd, 65536)
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                if not data:
                    return
        except (OSError, RuntimeError):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, b"")
        finally:
            loop.call_soon_threadsafe(reader_done.set)

    # a thread: stdin may be a tty, a pipe or a file, and only a thread reads all three alike
    loop.run_in_executor(None, read_blocking)
    while data := await queue.get():
        try:
            await proc.write_stdin(data)
        except PykataError:
            return  # the process is gone; nothing more to feed
    with contextlib.suppress(PykataError):
        await proc.close_stdin()
