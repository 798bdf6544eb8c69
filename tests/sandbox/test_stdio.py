"""The stdin feeder (pykata.sandbox.stdio.feed_stdin) with a fake process: it must always be able to end."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from pykata.sandbox.stdio import feed_stdin


class FakeProcess:
    """A fake of sandbox.Process recording what the feeder writes (no VM: only the host side is tested)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.got_data = asyncio.Event()

    async def write_stdin(self, data: bytes) -> None:
        self.data += data
        self.got_data.set()

    async def close_stdin(self) -> None:
        self.closed = True


def test_cancel_ends_the_feeder_while_the_pipe_stays_open() -> None:
    r, w = os.pipe()
    result: dict[str, object] = {}

    async def main() -> None:
        proc = FakeProcess()
        feeder = asyncio.ensure_future(feed_stdin(proc, r))  # type: ignore[arg-type]
        os.write(w, b"abc")
        await proc.got_data.wait()
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        result["data"], result["closed"] = bytes(proc.data), proc.closed

    # asyncio.run waits for the default executor at exit: a read(2) blocked in it would hang here
    runner = threading.Thread(target=asyncio.run, args=(main(),))
    try:
        runner.start()
        runner.join(30)
        assert not runner.is_alive(), "asyncio.run did not return while stdin stayed open"
        assert result == {"data": b"abc", "closed": False}
    finally:
        os.close(w)
        runner.join()
        os.close(r)


async def test_a_regular_file_is_fed_to_the_end_then_stdin_closed(tmp_path: Path) -> None:
    path = tmp_path / "in"
    path.write_bytes(b"x" * 200_000)
    proc = FakeProcess()
    with path.open("rb") as f:
        await feed_stdin(proc, f.fileno())  # type: ignore[arg-type]
    assert bytes(proc.data) == b"x" * 200_000 and proc.closed


async def test_a_pipe_is_fed_until_eof_then_stdin_closed() -> None:
    r, w = os.pipe()
    proc = FakeProcess()
    try:
        feeder = asyncio.ensure_future(feed_stdin(proc, r))  # type: ignore[arg-type]
        os.write(w, b"one ")
        await proc.got_data.wait()
        os.write(w, b"two")
        os.close(w)
        w = -1
        await asyncio.wait_for(feeder, 30)
        assert bytes(proc.data) == b"one two" and proc.closed
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
