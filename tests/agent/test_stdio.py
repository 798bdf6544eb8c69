"""The agent's output streams (pykata.agent.stdio) on real pipes: concurrent reads, as a host reading
ahead makes them, get the bytes in the order they were made, whatever order they wake in."""

from __future__ import annotations

import asyncio
import os

from pykata.agent.stdio import InputStream, OutputStream


async def test_concurrent_reads_are_served_in_the_order_they_were_made() -> None:
    r, w = os.pipe()
    stream = OutputStream(r)
    try:
        got: list[tuple[int, bytes]] = []

        async def reader(n: int) -> None:
            data, eof = await stream.read(1 << 20)
            got.append((n, b"EOF" if eof else data))

        for round_ in range(20):
            first = asyncio.ensure_future(reader(0))
            second = asyncio.ensure_future(reader(1))
            await asyncio.sleep(0)
            os.write(w, b"a%d" % round_)
            await asyncio.sleep(0.01)  # the first took it; the second waits again
            third = asyncio.ensure_future(reader(2))  # arrives while the second still waits
            await asyncio.sleep(0)
            os.write(w, b"b%d" % round_)
            await asyncio.wait_for(asyncio.gather(first, second), 5)
            os.write(w, b"c%d" % round_)
            await asyncio.wait_for(third, 5)
            assert got == [(0, b"a%d" % round_), (1, b"b%d" % round_), (2, b"c%d" % round_)]
            got.clear()
        os.close(w)
        w = -1
        assert await asyncio.wait_for(stream.read(10), 5) == (b"", True)
    finally:
        if w >= 0:
            os.close(w)
        stream.close()


async def test_take_now_reads_the_pipe_without_waiting_and_says_when_the_stream_ended() -> None:
    r, w = os.pipe()
    stream = OutputStream(r)
    try:
        assert stream.take_now(16) == (b"", False)  # nothing yet: no wait
        os.write(w, b"x" * 20)
        assert stream.take_now(16) == (b"x" * 16, False)  # read straight from the pipe, bounded
        os.close(w)
        w = -1
        assert stream.take_now(16) == (b"xxxx", True)  # the rest, and the end behind it
        assert stream.drained
    finally:
        if w >= 0:
            os.close(w)
        stream.close()


async def test_take_now_leaves_the_bytes_to_reads_made_before_it() -> None:
    r, w = os.pipe()
    stream = OutputStream(r)
    try:
        reader = asyncio.ensure_future(stream.read(16))
        await asyncio.sleep(0)
        os.write(w, b"first")
        assert stream.take_now(16) == (b"", False)
        assert await asyncio.wait_for(reader, 5) == (b"first", False)
    finally:
        os.close(w)
        stream.close()


async def test_wait_buffered_wakes_when_the_stream_holds_enough_or_its_buffer_is_full() -> None:
    r, w = os.pipe()
    stream = OutputStream(r, limit=8)
    try:
        waiter = asyncio.ensure_future(stream.wait_buffered(100))  # more than the buffer holds: full is enough
        os.write(w, b"1234")
        await asyncio.sleep(0.05)
        assert not waiter.done()
        os.write(w, b"5678")
        await asyncio.wait_for(waiter, 5)
        assert stream.buffered == 8 and stream.paused
    finally:
        os.close(w)
        stream.close()


async def test_write_now_takes_what_the_pipe_holds_and_never_waits() -> None:
    r, w = os.pipe()
    stdin = InputStream(w)
    try:
        big = b"y" * (4 << 20)  # more than any pipe holds
        taken = stdin.write_now(big)
        assert 0 < taken < len(big)
        assert stdin.write_now(b"more") == 0  # full: nothing taken, no wait
        stdin.close()
        assert stdin.write_now(b"more") == 0  # closed
    finally:
        os.close(r)
        stdin.close()
