"""pykata.sandbox.reaper on real processes, mounts and pipes (no VM): an owner killed with SIGKILL has its
sandbox's recorded processes, mounts and directory removed; a released reaper exits and touches nothing;
a directory whose id a live owner made again is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pykata.hypervisor import owned
from pykata.resources.mounts import mounts_under, unmount_all
from pykata.sandbox import state
from tests.shim.test_handoff import _gone

# Makes the sandbox directory given as argv[1] as Sandbox._start_vm does (its record, a reaper), says
# its reaper's pid, then waits to be killed (or, with argv[2] == "release", releases it and waits).
_OWNER = r"""
import json, os, sys, time
from pathlib import Path
import psutil
from pykata.sandbox import reaper, state
d = Path(sys.argv[1])
d.mkdir()
state.save(d, state.SandboxRecord(id=d.name, owner_pid=os.getpid(), created_at=time.time(), status="running"))
r = reaper.start(d)
# setsid has forked the reaper when start returns, but it may not have exec'd python yet: look a while
deadline = time.monotonic() + 30
kids = []
while not kids and time.monotonic() < deadline:
    kids = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
            and (p.info["cmdline"] or [])[1:3] == ["-m", "pykata.sandbox.reaper"] and str(d) in p.info["cmdline"]]
    time.sleep(0.02)
if sys.argv[2] == "release":
    r.release()
print(json.dumps({"reaper": kids[0].pid if kids else None}), flush=True)
time.sleep(600)
"""


@pytest.fixture
def sandbox_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "sb-reaper-test"
    yield d
    unmount_all(d)


def _start_owner(directory: Path, mode: str) -> tuple[subprocess.Popen[bytes], int]:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(directory), mode], stdout=subprocess.PIPE)
    assert owner.stdout is not None
    reaper_pid = json.loads(owner.stdout.readline())["reaper"]
    if reaper_pid is None:  # the owner (and the reaper it started) must not outlive the test
        owner.kill()
        owner.wait()
    assert reaper_pid is not None, "the owner found no reaper of its sandbox"
    return owner, reaper_pid


def _mount_tmpfs(target: Path) -> None:
    target.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nosuid,nodev", "tmpfs", str(target)], check=True)


def test_an_owner_killed_with_sigkill_leaves_no_process_mount_or_directory(sandbox_dir: Path) -> None:
    owner, reaper_pid = _start_owner(sandbox_dir, "keep")
    vm_helper = subprocess.Popen(["sleep", "600"])  # stands in for QEMU: recorded as the VM's
    try:
        (sandbox_dir / state.VM_DIR).mkdir()
        owned.record(sandbox_dir / state.VM_DIR, vm_helper.pid)
        _mount_tmpfs(sandbox_dir / "mounts")
        _mount_tmpfs(sandbox_dir / "mounts" / "inner")
        assert psutil.Process(reaper_pid).ppid() != owner.pid  # not the owner's child: nobody waits for it
        assert os.getsid(reaper_pid) == reaper_pid  # its own session: a terminal's Ctrl-C misses it
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert _gone(reaper_pid, 30), "the reaper did not finish"
        assert vm_helper.wait(10) == -signal.SIGKILL
        assert mounts_under(sandbox_dir) == [] and not sandbox_dir.exists()
    finally:
        for p in (owner, vm_helper):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_released_reaper_exits_and_touches_nothing(sandbox_dir: Path) -> None:
    owner, reaper_pid = _start_owner(sandbox_dir, "release")
    try:
        _mount_tmpfs(sandbox_dir / "mounts")
        assert _gone(reaper_pid, 30), "a released reaper did not exit"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        time.sleep(0.5)
        assert sandbox_dir.is_dir() and mounts_under(sandbox_dir) == [sandbox_dir / "mounts"]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_directory_a_live_owner_made_again_is_left(sandbox_dir: Path) -> None:
    owner, reaper_pid = _start_owner(sandbox_dir, "keep")
    try:
        # the same id made again by another owner that lives (this test process)
        state.save(sandbox_dir, state.SandboxRecord(id=sandbox_dir.name, owner_pid=os.getpid(),
                                                    created_at=time.time(), status="running"))
        _mount_tmpfs(sandbox_dir / "mounts")
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert _gone(reaper_pid, 30)
        assert sandbox_dir.is_dir() and mounts_under(sandbox_dir) == [sandbox_dir / "mounts"]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
