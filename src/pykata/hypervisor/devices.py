"""Devices the sandbox layer asks a hypervisor to attach (cold-plugged before start, hot-plugged after)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pykata.errors import HypervisorError

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


def check_device_id(device_id: str) -> None:
    """QEMU ids must start with a letter; keep them short and free of option syntax.

    Raises:
        HypervisorError: the id is unusable.
    """
    if not _ID.match(device_id):
        raise HypervisorError(f"bad device id {device_id!r}: letters, digits, '_', '.', '-', at most 31")


# The virtio-blk serial by which the guest finds the data disk (bulk file transfers).
DATA_DISK_SERIAL = "pkdata"


def root_slot_serial(slot: int) -> str:
    """The virtio-blk serial by which the guest finds image slot `slot` (/sys/block/vdX/serial)."""
    return f"pkroot{slot}"


@dataclass(frozen=True)
class BlockDevice:
    """A host file or block device as a virtio-blk disk."""

    id: str
    path: Path
    readonly: bool = False

    def __post_init__(self) -> None:
        check_device_id(self.id)


@dataclass(frozen=True)
class NetDevice:
    """A virtio-net NIC on a host tap: an open tap `fd` (preferred: QEMU needs no rights) or its name;
    or, with `user_net`, on QEMU's user-mode network (libslirp in QEMU: the guest's connections
    become QEMU's own sockets on the host, IPv4 only; filtering them by QEMU's uid is the caller's)."""

    id: str
    mac: str
    tap_fd: int | None = None
    tap_name: str | None = None
    user_net: bool = False

    def __post_init__(self) -> None:
        check_device_id(self.id)
        if not _MAC.match(self.mac):
            raise HypervisorError(f"device {self.id}: bad MAC address {self.mac!r} (want aa:bb:cc:dd:ee:ff)")
        if [self.tap_fd is not None, self.tap_name is not None, self.user_net].count(True) != 1:
            raise HypervisorError(f"device {self.id}: give exactly one of tap_fd, tap_name and user_net")


Device = BlockDevice | NetDevice
