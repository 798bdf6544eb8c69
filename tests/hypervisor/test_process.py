"""Owned child processes (pykata.hypervisor.process): reaped by the loop that started them, no thread each."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from pykata.hypervisor.process import ChildProcess


async def _spawn_many(tmp: Path, codes: list[int]) -> list[int]:
    children = [await ChildProcess.spawn(["sh", "-c", f"sleep 0.2; exit {c}"], name=f"c{i}",
                                         log_path=tmp / f"c{i}.log") for i, c in enumerate(codes)]
    return [await c.exit_code() for c in children]


def test_children_of_two_loops_are_reaped_without_a_thread_each(tmp_path: Path) -> None:
    before = threading.active_count()
    seen: list[int] = []
    results: dict[str, list[int]] = {}

    async def watch_threads(codes: list[int]) -> list[int]:
        task = asyncio.ensure_future(_spawn_many(tmp_path, codes))
        while not task.done():
            seen.append(threading.active_count())
            await asyncio.sleep(0.02)
        return await task

    other = threading.Thread(target=lambda: results.update(other=asyncio.run(_spawn_many(tmp_path, [7, 8]))))
    other.start()
    results["main"] = asyncio.run(watch_threads([0, 1, 2, 3, 4, 5]))
    other.join()
    assert results == {"main": [0, 1, 2, 3, 4, 5], "other": [7, 8]}
    # eight children at once, yet no thread but the second loop's own
    assert max(seen) <= before + 1
