"""pykata.factory.pool's refill timing: a waiting VM is made only once the pods that claimed pooled VMs
have started (their markers), and not in the gap between two waves of a burst of starts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path

from pykata.config import Config, load_config
from pykata.factory import pool


def _config(tmp_path: Path) -> Config:
    base = load_config()
    return dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(tmp_path)))


def _entry(config: Config, pid: int, name: str = "pool-00000000000a") -> pool.PoolEntry:
    root = pool.pool_root(config)
    root.mkdir(parents=True, exist_ok=True)
    return pool.PoolEntry(name, root, pid, pool.fingerprint(config), time.time())


def test_a_refill_waits_while_a_claimed_pod_starts_and_just_after(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert pool.starting(config) == (0, float("inf"))
    assert pool.quiet_wait(config, time.time()) == 0  # never a claim: at once

    marker = pool.begin_start(_entry(config, os.getpid()))
    assert marker.exists() and pool.starting(config)[0] == 1
    assert pool.quiet_wait(config, time.time()) > 0
    # never past REFILL_MAX_DEFER after the waiting process started, however busy the pool
    assert pool.quiet_wait(config, time.time() - pool.REFILL_MAX_DEFER - 1) == 0

    pool.end_start(marker)  # the pod's first container started
    busy, since = pool.starting(config)
    assert busy == 0 and since < pool.REFILL_QUIET
    # the next wave's claim usually comes right after: still quiet_wait > 0 for a moment
    assert 0 < pool.quiet_wait(config, time.time()) <= pool.REFILL_QUIET
    os.utime(marker.parent, (time.time() - 10, time.time() - 10))
    assert pool.quiet_wait(config, time.time()) == 0
    pool.end_start(marker)  # again: a no-op


def test_markers_of_ended_or_stuck_starts_do_not_hold_the_refill(tmp_path: Path) -> None:
    config = _config(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = pool.begin_start(_entry(config, dead.pid, "pool-00000000000b"))
    stuck = pool.begin_start(_entry(config, os.getpid(), "pool-00000000000c"))
    old = time.time() - 3 * pool.START_LIMIT
    os.utime(stuck, (old, old))
    assert pool.starting(config)[0] == 0
    assert not gone.exists() and not stuck.exists(), "markers of ended starts are removed"
    (gone.parent / "pool-00000000000d").write_text("not a pid")  # unreadable: ignored
    assert pool.starting(config)[0] == 0
