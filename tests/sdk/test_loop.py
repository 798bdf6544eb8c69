"""The SDK's shared event loop thread (pykata.sdk.loop), without VMs: it always ends, and a call
interrupted in the caller's thread is cancelled and unwound before the interrupt is re-raised."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from pykata.sdk.loop import LoopThreadGone, SharedLoop


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pykata-sdk-loop"]


def test_one_thread_for_all_users_ended_by_the_last() -> None:
    shared = SharedLoop()
    tokens = [shared.acquire() for _ in range(20)]
    assert len(_loop_threads()) == 1
    assert shared.run(asyncio.sleep(0, result=42)) == 42
    for t in tokens[:-1]:
        shared.release(t)
    assert len(_loop_threads()) == 1  # still in use
    shared.release(tokens[-1])
    assert _loop_threads() == []
    with pytest.raises(LoopThreadGone):
        shared.run(asyncio.sleep(0))


def test_an_exception_of_the_coroutine_reaches_the_caller() -> None:
    shared = SharedLoop()
    token = shared.acquire()
    try:
        async def fail() -> None:
            raise ValueError("from the loop")

        with pytest.raises(ValueError, match="from the loop"):
            shared.run(fail())
    finally:
        shared.release(token)


def test_ctrl_c_cancels_the_call_and_waits_for_its_cleanup() -> None:
    shared = SharedLoop()
    token = shared.acquire()
    events: list[str] = []

    async def slow_with_cleanup() -> None:
        try:
            events.append("started")
            threading.Timer(0.2, signal.raise_signal, args=(signal.SIGINT,)).start()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # cleanup that takes a while (a VM stop)
            events.append("cleaned up")
            raise

    try:
        with pytest.raises(KeyboardInterrupt):
            shared.run(slow_with_cleanup())
        assert events == ["started", "cleaned up"]  # the cleanup finished before the interrupt came out
    finally:
        shared.release(token)
    assert _loop_threads() == []
