"""pykata.factory.pool's priorities on real processes: a process tree started under SCHED_IDLE (as a
waiting VM is made) is put back under SCHED_OTHER, every thread of every process in it."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from pykata.factory import pool


def _policies(pid: int) -> list[int]:
    out = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in os.listdir(f"/proc/{current}/task"):
            out.append(os.sched_getscheduler(int(task)))
            with open(f"/proc/{current}/task/{task}/children") as f:
                todo += [int(k) for k in f.read().split()]
    return out


def test_normal_priority_puts_a_whole_idle_tree_back() -> None:
    # a parent and a child, both inheriting SCHED_IDLE from chrt (as QEMU inherits it from its shim)
    proc = subprocess.Popen(["chrt", "--idle", "0", "sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(_policies(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _policies(proc.pid) == [os.SCHED_IDLE] * 2
        pool.normal_priority(proc.pid)
        assert _policies(proc.pid) == [os.SCHED_OTHER] * 2
        pool.normal_priority(proc.pid)  # again: a no-op
        pool.normal_priority(2 ** 22 + 1)  # no such process: never raises
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
