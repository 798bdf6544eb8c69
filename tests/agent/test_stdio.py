"""The agent's output streams (pykata.agent.stdio) on real pipes: concurrent reads, as a host reading
ahead makes them, get the bytes in the order they were made, whatever order they wake in."""

from __future__ import annotations

import asyncio
import os

from pykata.agent.stdio import OutputStream


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
