"""Hot-plugging on q35 through QMP: block and net devices into free PCIe root ports, DIMMs, vCPUs.

Unplugging needs the guest's consent (ACPI / PCIe hotplug): QEMU reports DEVICE_DELETED once the guest
let go, and we wait for it with a deadline. Every function takes the VM's QMP channel, nothing more.
"""

from __future__ import annotations

import os
from typing import Any

from pykata.config.schema import QemuConfig
from pykata.errors import HypervisorError
from pykata.hypervisor.devices import BlockDevice, Device, NetDevice
from pykata.hypervisor.errors import NotSupportedError, QmpError
from pykata.hypervisor.qemu.launch import HOTPLUG_PORTS
from pykata.hypervisor.qemu.qmp import QmpChannel

UNPLUG_TIMEOUT = 5.0


def free_port(used: set[int]) -> int:
    """The first free hotplug root port.

    Raises:
        HypervisorError: all are taken.
    """
    for port in range(HOTPLUG_PORTS):
        if port not in used:
            return port
    raise HypervisorError(f"all {HOTPLUG_PORTS} hotplug ports are in use")


async def add_block(qmp: QmpChannel, dev: BlockDevice, port: int, *, shared: bool) -> None:
    """blockdev-add + device_add virtio-blk-pci; rolls the blockdev back if the device fails.

    Raises:
        QmpError: QEMU refused.
    """
    node = f"drive-{dev.id}"
    # A jailed QEMU cannot open host paths (chroot, unprivileged uid): pykata opens the file and
    # passes it in an fd set, which QEMU's file driver opens as /dev/fdset/N.
    try:
        fd = os.open(dev.path, (os.O_RDONLY if dev.readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"device {dev.id}: cannot open {dev.path}: {exc.strerror}") from None
    try:
        added = await qmp.execute("add-fd", {}, fd=fd)
    finally:
        os.close(fd)
    fdset = added["fdset-id"] if isinstance(added, dict) else None
    if not isinstance(fdset, int):
        raise HypervisorError(f"device {dev.id}: add-fd answered {added!r}")
    try:
        await qmp.execute("blockdev-add", {
            "driver": "raw", "node-name": node, "read-only": dev.readonly,
            "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}", "read-only": dev.readonly},
        })
    except HypervisorError:
        await qmp.execute("remove-fd", {"fdset-id": fdset})
        raise
    try:
        await qmp.execute("device_add", {"driver": "virtio-blk-pci", "id": dev.id, "drive": node,
                                         "bus": f"rp{port}"})
    except HypervisorError:
        await qmp.execute("blockdev-del", {"node-name": node})
        raise


async def add_net(qmp: QmpChannel, dev: NetDevice, port: int) -> None:
    """Pass the tap fd (getfd, SCM_RIGHTS under the channel lock), netdev_add, device_add virtio-net-pci.

    Raises:
        QmpError: QEMU refused.
    """
    netdev = f"netdev-{dev.id}"
    args: dict[str, Any] = {"type": "tap", "id": netdev, "vhost": False}
    if dev.tap_fd is not None:
        fdname = f"fd-{dev.id}"
        await qmp.execute("getfd", {"fdname": fdname}, fd=dev.tap_fd)
        args["fd"] = fdname
    else:
        args.update({"ifname": dev.tap_name, "script": "no", "downscript": "no"})
    await qmp.execute("netdev_add", args)
    try:
        await qmp.execute("device_add", {"driver": "virtio-net-pci", "id": dev.id, "netdev": netdev,
                                         "mac": dev.mac, "bus": f"rp{port}"})
    except HypervisorError:
        await qmp.execute("netdev_del", {"id": netdev})
        raise


async def remove(qmp: QmpChannel, dev: Device) -> None:
    """device_del, wait for the guest to release it, then drop the backend.

    Raises:
        HypervisorError: QEMU refused, or the guest did not release the device in time.
    """
    await _device_del(qmp, dev.id)
    if isinstance(dev, BlockDevice):
        await qmp.execute("blockdev-del", {"node-name": f"drive-{dev.id}"})
    elif isinstance(dev, NetDevice):
        await qmp.execute("netdev_del", {"id": f"netdev-{dev.id}"})


async def add_memory(qmp: QmpChannel, dimm_id: str, size_mib: int, *, shared: bool) -> None:
    """A memory backend plus a pc-dimm; the guest onlines it (MEMORY_HOTPLUG_DEFAULT_ONLINE).

    Raises:
        QmpError: QEMU refused (no free slot, above maxmem, ...).
    """
    backend = f"mem-{dimm_id}"
    qom: dict[str, Any] = {"qom-type": "memory-backend-memfd" if shared else "memory-backend-ram",
                           "id": backend, "size": size_mib * 1024 * 1024}
    if shared:
        qom["share"] = True
    await qmp.execute("object-add", qom)
    try:
        await qmp.execute("device_add", {"driver": "pc-dimm", "id": dimm_id, "memdev": backend})
    except HypervisorError:
        await qmp.execute("object-del", {"id": backend})
        raise


async def add_cpu(qmp: QmpChannel, cpu_id: str) -> None:
    """Plug the first free vCPU slot QEMU offers.

    Raises:
        HypervisorError: no free slot, or QEMU refused.
    """
    slots = await qmp.execute("query-hotpluggable-cpus")
    free = [s for s in slots if "qom-path" not in s]
    if not free:
        raise HypervisorError("no free vCPU slot (at maxcpus)")
    # QEMU lists slots highest first; plug the lowest so ids fill in order.
    slot = free[-1]
    await qmp.execute("device_add", {"driver": slot["type"], "id": cpu_id, **slot["props"]})


async def remove_cpu(qmp: QmpChannel, cpu_id: str) -> None:
    """Unplug a hot-added vCPU (the guest must release it).

    Raises:
        HypervisorError: QEMU refused or the guest did not release it in time.
    """
    await _device_del(qmp, cpu_id)


async def _device_del(qmp: QmpChannel, device_id: str) -> None:
    with qmp.listener("DEVICE_DELETED", where=lambda e: e.data.get("device") == device_id) as deleted:
        await qmp.execute("device_del", {"id": device_id})
        try:
            await deleted.get(UNPLUG_TIMEOUT)
        except QmpError as exc:
            if qmp.closed:
                raise  # the VM is gone
            raise HypervisorError(f"device {device_id}: the guest did not release it: {exc}") from None


class Hotplugged:
    """What was hot-plugged into one running q35 VM (root ports taken, DIMMs, vCPUs), so a later
    unplug or resize knows what it may undo. `label` names the VM in errors ("VM <id>")."""

    def __init__(self, label: str, config: QemuConfig) -> None:
        self._label = label
        self._config = config
        self._ports: dict[str, int] = {}
        self._memory_mib = config.default_memory
        self._dimms = 0
        self._vcpus = config.default_vcpus
        self._cpu_ids: list[str] = []

    @property
    def memory_mib(self) -> int:
        return self._memory_mib

    async def add_device(self, qmp: QmpChannel, device: Device, *, shared: bool) -> None:
        """Plug `device` into the first free root port. Raises HypervisorError (QmpError)."""
        port = free_port(set(self._ports.values()))
        if isinstance(device, BlockDevice):
            await add_block(qmp, device, port, shared=shared)
        else:
            await add_net(qmp, device, port)
        self._ports[device.id] = port

    async def remove_device(self, qmp: QmpChannel, device: Device) -> None:
        """Unplug a device add_device() plugged.

        Raises:
            NotSupportedError: it was cold-plugged (on the command line).
            HypervisorError: QEMU refused, or the guest did not release it in time.
        """
        if device.id not in self._ports:
            raise NotSupportedError(f"{self._label}: device {device.id} was cold-plugged and cannot be removed")
        await remove(qmp, device)
        del self._ports[device.id]

    async def resize_memory(self, qmp: QmpChannel, memory_mib: int, *, shared: bool) -> int:
        """Grow guest memory to `memory_mib` with one more DIMM; return the memory now plugged.

        Raises:
            NotSupportedError: shrinking.
            HypervisorError: above the maximum, no free slot, or QEMU refused.
        """
        if memory_mib < self._memory_mib:
            raise NotSupportedError(f"{self._label}: shrinking memory ({self._memory_mib} -> {memory_mib} MiB)")
        limit = self._config.resolved_maxmemory()
        if memory_mib > limit:
            raise HypervisorError(f"{self._label}: {memory_mib} MiB is above the maximum {limit} MiB")
        if memory_mib == self._memory_mib:
            return self._memory_mib
        if self._dimms >= self._config.memory_slots:
            raise HypervisorError(f"{self._label}: all {self._config.memory_slots} memory slots are used")
        await add_memory(qmp, f"dimm{self._dimms}", memory_mib - self._memory_mib, shared=shared)
        self._dimms += 1
        self._memory_mib = memory_mib
        return memory_mib

    async def resize_vcpus(self, qmp: QmpChannel, vcpus: int) -> int:
        """Plug or unplug vCPUs until `vcpus` are present; return the number now present.

        Raises:
            NotSupportedError: going below the boot vCPUs (only hot-added ones can be removed).
            HypervisorError: outside 1..maxvcpus, or QEMU/the guest refused.
        """
        limit = self._config.resolved_maxvcpus()
        if not 1 <= vcpus <= limit:
            raise HypervisorError(f"{self._label}: {vcpus} vCPUs is outside 1..{limit}")
        while self._vcpus < vcpus:
            cpu_id = f"cpu{len(self._cpu_ids)}"
            await add_cpu(qmp, cpu_id)
            self._cpu_ids.append(cpu_id)
            self._vcpus += 1
        while self._vcpus > vcpus:
            if not self._cpu_ids:
                raise NotSupportedError(f"{self._label}: only hot-added vCPUs can be removed")
            cpu_id = self._cpu_ids[-1]
            await remove_cpu(qmp, cpu_id)
            self._cpu_ids.pop()
            self._vcpus -= 1
        return self._vcpus
