"""A per-test factory of VMs (Firecracker's MicroVMFactory idea): tests get their VMs from it, and when
the test ends it stops each VM it handed out and checks that nothing of it is left, so a leak fails the
test that made it instead of the session's leak check at the very end.

    async def test_x(vm_factory: VmFactory) -> None:
        vm = vm_factory.build("t1", config, kernel=k, initrd=i)     # a QemuHypervisor
        vm = vm_factory.track(await pykata.factory.start_vm(...))   # or one made elsewhere
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil

from pykata.config import Config
from pykata.hypervisor.base import Hypervisor
from pykata.hypervisor.qemu.driver import QemuHypervisor


def held_deleted_files(pid: int, under: Path) -> list[str]:
    """Files under `under` that process `pid` (a VM's QEMU) still holds open although they have no name
    any more."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(under)) and target.endswith("(deleted)"):
            out.append(target)
    return out


class VmFactory:
    def __init__(self, test: str) -> None:
        self.test = test
        self.vms: list[Hypervisor] = []
        self._pids: dict[int, set[int]] = {}

    def build(self, vm_id: str, config: Config, **kwargs: Any) -> QemuHypervisor:
        """A QemuHypervisor (not prepared) that the test may use as it likes; stopped and checked at its end."""
        vm = QemuHypervisor(vm_id, config, **kwargs)
        self.vms.append(vm)
        return vm

    def track(self, vm: Hypervisor) -> Hypervisor:
        """Take a VM made elsewhere (pykata.factory.start_vm, a Sandbox) into the end-of-test check."""
        if vm not in self.vms:
            self.vms.append(vm)
        self.note_pid(vm)
        return vm

    def note_pid(self, vm: Hypervisor) -> None:
        """Remember the VM's current VMM pid (build() VMs are noted again at the end, before stop)."""
        if vm.pid is not None:
            self._pids.setdefault(id(vm), set()).add(vm.pid)

    async def stop_and_check(self) -> list[str]:
        """Stop every VM (idempotent) and return what each left behind: a live VMM process, a helper
        process naming its VM directory, the VM directory itself."""
        problems = []
        for vm in self.vms:
            self.note_pid(vm)
            try:
                await vm.stop()
            except Exception as exc:
                problems.append(f"{_name(vm)}: stop() raised {exc!r}")
            problems += [f"{_name(vm)}: {p}" for p in self._leftovers(vm)]
        return problems

    def _leftovers(self, vm: Hypervisor) -> list[str]:
        out = []
        for pid in sorted(self._pids.get(id(vm), ())):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(f"its VMM (pid {pid}) still runs")
            except psutil.NoSuchProcess:
                pass
        vm_dir = _vm_dir(vm)
        if vm_dir is not None:
            if vm_dir.exists():
                out.append(f"its directory {vm_dir} still exists")
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if str(vm_dir) + "/" in cmdline:
                    out.append(f"process {proc.info['pid']} still names its directory: {cmdline[:120]}")
        return out


def _vm_dir(vm: Hypervisor) -> Path | None:
    paths = getattr(vm, "paths", None)  # QemuHypervisor's VmPaths
    return Path(paths.dir) if paths is not None else None


def _name(vm: Hypervisor) -> str:
    return f"VM {getattr(vm, 'vm_id', '?')}"
