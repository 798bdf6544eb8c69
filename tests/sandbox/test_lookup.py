"""`pykata cleanup` (lookup.cleanup_orphans) ends exactly what a dead owner's sandbox started: the
processes its driver recorded (and what runs under them), never a process of another sandbox whose path
extends this one's (ids "abc" and "abc1"), nor a user's process that merely names a file of it, nor a
process that reused the recorded VMM pid. The processes here are stand-ins (sleeping Pythons), started
the way the driver starts QEMU and virtiofsd (ChildProcess.spawn)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pykata.config import Config, load_config
from pykata.fsutil import start_ticks
from pykata.hypervisor.process import ChildProcess
from pykata.sandbox import state
from pykata.sandbox.lookup import cleanup_orphans
from pykata.sandbox.sandbox import VM_DIR, sandboxes_dir

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _config(tmp_path: Path) -> Config:
    base = load_config()
    return dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, runtime_dir=str(tmp_path / "run")))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _alive(pid: int, ticks: int | None) -> bool:
    return ticks is not None and start_ticks(pid) == ticks


async def test_cleanup_ends_only_what_the_dead_sandbox_started(tmp_path: Path) -> None:
    config = _config(tmp_path)
    mine, other = sandboxes_dir(config) / "abc", sandboxes_dir(config) / "abc1"
    for d in (mine, other):
        (d / VM_DIR).mkdir(parents=True)
    bystanders: list[subprocess.Popen[bytes]] = []
    children: list[ChildProcess] = []
    try:
        # the dead owner's VMM stand-in, with a process under it (QEMU under its lifeline wrapper)
        vmm = await ChildProcess.spawn(["sh", "-c", f"{' '.join(SLEEPER[:2])} '{SLEEPER[2]}' & wait"],
                                       name="fake qemu", log_path=mine / VM_DIR / "qemu.log")
        children.append(vmm)
        deadline = time.monotonic() + 10
        while not psutil.Process(vmm.pid).children() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        [below] = psutil.Process(vmm.pid).children()
        below_ticks = start_ticks(below.pid)
        # the live sandbox "abc1": its own recorded child, its QEMU's name extends "pykata-abc"
        neighbour_child = await ChildProcess.spawn(SLEEPER, name="fake virtiofsd", log_path=other / VM_DIR / "x.log")
        children.append(neighbour_child)
        neighbour_vmm = subprocess.Popen([*SLEEPER, "-name", "pykata-abc1,debug-threads=on",
                                          f"{other}/{VM_DIR}/qmp.sock"])
        # a user's process naming a file of the dead sandbox (`tail /run/pykata/sandboxes/abc/vm/qemu.log`)
        user = subprocess.Popen([*SLEEPER, str(mine / VM_DIR / "qemu.log"), str(mine)])
        bystanders += [neighbour_vmm, user]
        # the dead sandbox's record names, as its VMM pid, a pid that "abc1"'s QEMU reused
        state.save(mine, state.SandboxRecord(id="abc", owner_pid=_dead_pid(), created_at=time.time(),
                                             status="running", vmm_pid=neighbour_vmm.pid))
        state.save(other, state.SandboxRecord(id="abc1", owner_pid=os.getpid(), created_at=time.time(),
                                              status="running", vmm_pid=neighbour_vmm.pid))

        assert await asyncio.to_thread(cleanup_orphans, config) == ["abc"]

        assert neighbour_child.running, "a process of the sandbox whose id extends this one's was killed"
        assert neighbour_vmm.poll() is None, "the process that reused the recorded VMM pid was killed"
        assert user.poll() is None, "a process that merely names the sandbox's directory was killed"
        # ended (cleanup's wait may reap it before asyncio's watcher does, which then reports 255: here
        # the dead owner's processes are this test's children; in use, they are no process's of cleanup)
        assert await vmm.wait(5) in (-9, 255)
        assert not _alive(below.pid, below_ticks), "the process under the recorded one was left running"
        assert not mine.exists() and other.is_dir()
    finally:
        for p in bystanders:
            p.kill()
            p.wait()
        for c in children:
            await c.kill()
