"""pykata.factory.pool's refill timing: a waiting VM is made only once the pods that claimed pooled VMs
have started (their markers), and not in the gap between two waves of a burst of starts."""

from __future__ import annotations

import dataclasses
import json
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


def _ready_entry(config: Config) -> pool.PoolEntry:
    """A fake ready waiting VM: this process registered, with a (plain file) control socket."""
    entry = _entry(config, os.getpid(), "pool-0000000000ff")
    entry.meta.write_text(json.dumps({"pid": entry.pid, "fingerprint": entry.fingerprint,
                                      "created_at": entry.created_at}))
    entry.control.write_text("")
    return entry


def test_a_refill_waits_while_a_claimed_pod_starts_and_just_after(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert pool.starting(config) == (0, float("inf"))
    assert pool.quiet_wait(config, time.time()) == 0  # never a claim: at once
    ready = _ready_entry(config)  # the burst still has a pooled VM to take

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
    pool.withdraw(ready)


def test_a_refill_does_not_wait_once_the_pool_holds_no_ready_vm(tmp_path: Path) -> None:
    # pods starting one after another (a churn of pod cycles) never leave REFILL_QUIET of quiet: with
    # nothing left to claim, the refill waits only for the starts in flight, not REFILL_MAX_DEFER
    config = _config(tmp_path)
    marker = pool.begin_start(_entry(config, os.getpid()))
    ready = _ready_entry(config)
    pool.withdraw(ready)  # claimed: the pool is empty
    assert pool.quiet_wait(config, time.time()) > 0, "a start in flight still holds it"
    pool.end_start(marker)
    assert pool.starting(config)[1] < pool.REFILL_QUIET
    assert pool.quiet_wait(config, time.time()) == 0
    ready = _ready_entry(config)
    assert pool.quiet_wait(config, time.time()) > 0, "a ready VM left: the burst may go on"
    pool.withdraw(ready)


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
