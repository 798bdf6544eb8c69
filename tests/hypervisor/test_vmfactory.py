"""The per-test VM factory (tests/vmfactory.py) really reports what a VM left behind: a fake VM whose
stop() forgets its process and directory is caught, naming the VM and each leftover."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.vmfactory import VmFactory


@dataclass
class _Paths:
    dir: Path


class FakeLeakyVm:
    """A fake VM (unit test of the checker's error path): stop() returns without ending anything."""

    def __init__(self, vm_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.vm_id = "leaky"
        self.paths = _Paths(vm_dir)
        self._proc = proc
        self.stopped = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def stop(self) -> None:
        self.stopped += 1


async def test_leftovers_are_named(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    # a stand-in VMM naming a socket in its VM directory, as QEMU's -qmp does
    proc = subprocess.Popen(["sh", "-c", 'sleep 60; : "$0"', f"{vm_dir}/qmp.sock"], start_new_session=True)
    try:
        factory = VmFactory("this-test")
        vm: Any = FakeLeakyVm(vm_dir, proc)
        factory.track(vm)
        problems = await factory.stop_and_check()
        assert vm.stopped == 1
        assert any(f"VMM (pid {proc.pid}) still runs" in p for p in problems), problems
        assert any(f"process {proc.pid} still names its directory" in p for p in problems), problems
        assert any(f"directory {vm_dir} still exists" in p for p in problems), problems
        assert all(p.startswith("VM leaky: ") for p in problems)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # sh and its sleep
        proc.wait()
    vm_dir.rmdir()
    assert await factory.stop_and_check() == []  # nothing left: nothing reported
