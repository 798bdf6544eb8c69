"""A pool entry names its waiting process by pid and start time: when that process died and its pid was
reused by another (here a sleeping Python standing in for any process of the host), `prune` (which
SIGKILLs a waiting process stuck starting) and `destroy` (SIGTERM, then SIGKILL) leave that other
process alone and only remove the entry."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from pykata.config import load_config
from pykata.factory import pool


def test_a_reused_pid_is_not_a_waiting_vm(tmp_path: Path) -> None:
    base = load_config()
    config = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(tmp_path)))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stuck, gone = (pool._register(config, f"pool-{n:012x}", other.pid) for n in (1, 2))
        assert stuck.alive and gone.alive  # registered with its start time: the process it names runs
        for entry in (stuck, gone):
            # the waiting process died and `other` got its pid: the entry's start time is not other's
            data = json.loads(entry.meta.read_text())
            data.update(start=data.get("start", 1) - 1, created_at=time.time() - 2 * pool.STARTING_LIMIT)
            entry.meta.write_text(json.dumps(data))
        assert not any(e.alive for e in pool.list_entries(config))
        assert sorted(pool.prune(config)) == [stuck.id, gone.id]
        assert other.poll() is None, "prune killed a process that only reused a waiting VM's pid"
        third = pool._register(config, "pool-000000000003", other.pid)
        data = json.loads(third.meta.read_text())
        third.meta.write_text(json.dumps({**data, "start": data.get("start", 1) - 1}))
        assert pool.destroy(config, timeout=1) == []
        assert other.poll() is None, "destroy signalled a process that only reused a waiting VM's pid"
    finally:
        other.kill()
        other.wait()
