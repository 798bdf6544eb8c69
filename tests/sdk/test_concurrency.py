"""Many sandboxes from one Python process on one event loop: the process's thread count does not grow
with the number of sandboxes (QEMU children are reaped through pidfds, agent channels are sockets on
the loop). The 20-sandbox figure is bench/sdk_bench.py's --concurrent; this test keeps to three."""

from __future__ import annotations

import asyncio
import threading

import pytest

import pykata

pytestmark = [pytest.mark.vm]

COUNT = 3
EXTRA_THREADS = 2  # asyncio's default executor and child watcher may start one each, whatever COUNT is


async def test_sandboxes_on_one_loop_need_no_thread_each() -> None:
    baseline = threading.active_count()
    most = baseline
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, threading.active_count())
            await asyncio.sleep(0.01)

    async def one(i: int) -> bytes:
        async with pykata.AsyncSandbox() as sb:
            proc = await sb.spawn(f"echo {i}; sleep 1")
            r = await sb.run(["echo", "ok"])
            assert (await proc.result(60)).stdout == f"{i}\n".encode()
            return r.stdout

    sampler = asyncio.ensure_future(sample())
    try:
        outs = await asyncio.gather(*(one(i) for i in range(COUNT)))
    finally:
        done.set()
        await sampler
    assert outs == [b"ok\n"] * COUNT
    assert most - baseline <= EXTRA_THREADS, f"{most - baseline} threads more for {COUNT} sandboxes"
