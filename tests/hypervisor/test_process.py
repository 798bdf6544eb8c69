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


async def test_a_lifeline_wrapper_killed_at_once_leaves_no_program(tmp_path: Path) -> None:
    """A lifeline wrapper (jail.lifeline_prefix: the outer unshare and the shell it forks as a PID
    namespace's init) killed right after its start, as a Create cancelled while the VM starts kills
    it: before the forked init has set its parent-death signal, the init and its program outlived the
    kill, re-parented to the host's init (40 of 200 such kills left them). ChildProcess.kill ends the
    child's whole process group, so none may be left."""
    import subprocess
    import uuid

    from pykata.hypervisor.jail import lifeline_prefix

    tag = uuid.uuid4().hex
    try:
        for i in range(100):
            child = await ChildProcess.spawn([*lifeline_prefix(), "sh", "-c", f"sleep 1000; : {tag}"],
                                             name=f"wrapper{i}", log_path=tmp_path / "wrapper.log",
                                             die_with_parent=True)
            if i % 2:
                await asyncio.sleep(0.002)
            assert await child.kill() is not None
        await asyncio.sleep(1)  # a kill by parent death, had there been one, is delivered by now
        left = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()
        assert not left, f"{len(left)} processes outlived their killed wrappers"
    finally:
        subprocess.run(["pkill", "-KILL", "-f", tag], check=False)
