"""Hypervisors: the `Hypervisor` interface and its QEMU implementation.

    vm = QemuHypervisor("sandbox-1", load_config(), shared_dir=Path("/run/pykata/shared/sandbox-1"))
    await vm.prepare(); await vm.start(); await vm.wait_ready()
    ...
    await vm.stop()          # idempotent, concurrent-safe, bounded
"""

from pykata.hypervisor.base import AgentEndpoint, Hypervisor, ReadinessProbe, VmExit
from pykata.hypervisor.devices import BlockDevice, Device, NetDevice
from pykata.hypervisor.errors import NotSupportedError, QmpError, VmExitedError
from pykata.hypervisor.qemu.driver import QemuHypervisor

__all__ = [
    "AgentEndpoint",
    "BlockDevice",
    "Device",
    "Hypervisor",
    "NetDevice",
    "NotSupportedError",
    "QemuHypervisor",
    "QmpError",
    "ReadinessProbe",
    "VmExit",
    "VmExitedError",
]
