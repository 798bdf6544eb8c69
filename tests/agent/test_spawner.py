"""The agent's exec spawner (agent/spawner.py) as a process on its own: what it answers, and that the
agent notices when it is gone (nsexec then forks the child itself). The exec children it forks are
compared with crun's in a guest by tests/agent/test_nsexec_vm.py (the agent runs with the spawner)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from pykata.agent.reaper import Reaper
from pykata.agent.spawner import REQUEST_FDS, Spawner


async def test_a_bad_request_is_refused_and_a_dead_spawner_is_noticed() -> None:
    reaper = Reaper()
    reaper.start(subreaper=False)
    spawner = Spawner(reaper)
    spawner.start()
    try:
        assert spawner.running
        r, w = os.pipe()
        try:
            # too few descriptors: refused with a message, the spawner serves on
            with pytest.raises(OSError, match="descriptors"):
                await asyncio.wait_for(spawner.fork({}, [r, w]), 20)
            # the right count but not a plan: refused too
            fds = [os.dup(r) for _ in range(REQUEST_FDS)]
            try:
                with pytest.raises(OSError, match="spawner"):
                    await asyncio.wait_for(spawner.fork({"bogus": 1}, fds), 20)
            finally:
                for fd in fds:
                    os.close(fd)
        finally:
            os.close(r)
            os.close(w)
        assert spawner.running
        os.kill(spawner.pid, signal.SIGKILL)
        for _ in range(200):
            if not spawner.running:
                break
            await asyncio.sleep(0.05)
        assert not spawner.running  # nsexec.spawn then forks in the agent
    finally:
        spawner.close()
        reaper.close()
