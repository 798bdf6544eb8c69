"""Hot-plugging on q35 through QMP: block and net devices into free PCIe root ports, DIMMs, vCPUs.

Unplugging needs the guest's consent (ACPI / PCIe hotplug): QEMU reports DEVICE_DELETED once the guest
let go, and we wait for it with a deadline. Every function takes the VM's QMP channel, nothing more.
"""

from __future__ import annotations

import os
from typing import Any

from pykata.errors import HypervisorError
from pykata.hypervisor.devices import BlockDevice, Device, NetDevice
from pykata.hypervisor.errors import QmpError
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
