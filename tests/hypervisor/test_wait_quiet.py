"""readiness.wait_quiet (a template VM is saved once its guest idles, pykata.factory.template): on real
processes, an idle one is quiet within two windows and a spinning one never is."""

from __future__ import annotations

import subprocess
import sys

from pykata.hypervisor.readiness import cpu_seconds, wait_quiet


async def test_an_idle_process_is_quiet_and_a_busy_one_is_not() -> None:
    idle = subprocess.Popen(["sleep", "30"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        took = await wait_quiet(idle.pid, window=0.1, limit=5.0)
        assert took is not None and took < 1.0, took
        assert await wait_quiet(busy.pid, window=0.1, limit=0.6) is None
        assert cpu_seconds(busy.pid) > 0.05
    finally:
        for proc in (idle, busy):
            proc.kill()
            proc.wait()
    assert cpu_seconds(busy.pid) == 0.0  # gone: no reading, no error
