"""Filling the read-only image slots of a running VM (cmdline.RootSlot) through QMP.

A slot is a virtio-blk device on a raw node whose `file` child starts as an empty null-co node. To
give the guest an image, pykata opens the file read-only and passes the fd (`add-fd`: a jailed QEMU
cannot open host paths), adds a `file` node on /dev/fdset/N read-only, and `blockdev-reopen`s the
slot's raw node onto it; emptying reopens it onto its null-co node again and deletes the file node.
No hotplug is involved, so this works on microvm and on VMs restored from a template (whose slots
were saved empty). The guest sees the new content once it drops its page cache for the disk
(BLKFLSBUF: the agent does it before mounting); the capacity never changes (every image file is
exactly the slot's size).

Read-only holds at every level: the fd is O_RDONLY, the nodes are read-only, so the device is (the
guest's writes fail with EPERM/EIO), and nothing the guest does reaches the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.hypervisor.qemu.launch import root_slot_node
from pykata.hypervisor.qemu.qmp import QmpChannel


@dataclass
class _Filled:
    node: str
    fdset: int


@dataclass
class RootSlots:
    """What each image slot of one VM holds; `label` names the VM in errors."""

    label: str
    count: int
    size: int
    _filled: dict[int, _Filled] = field(default_factory=dict)
    _generation: int = 0

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.count:
            raise HypervisorError(f"{self.label}: no image slot {slot} (the VM has {self.count})")

    async def fill(self, qmp: QmpChannel, slot: int, image: Path) -> None:
        """Give slot `slot` the content of `image` (read-only), replacing what it held.

        Raises:
            HypervisorError: no such slot, the file cannot be opened or is not the slot's size, or
                QEMU refused (the slot is then as it was before).
        """
        self._check(slot)
        try:
            fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise HypervisorError(f"{self.label}: image slot {slot}: cannot open {image}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != self.size:
                raise HypervisorError(f"{self.label}: image slot {slot}: {image} is {size} bytes, the slot "
                                      f"{self.size}")
            added = await qmp.execute("add-fd", {}, fd=fd)
        finally:
            os.close(fd)
        fdset = added.get("fdset-id") if isinstance(added, dict) else None
        if not isinstance(fdset, int):
            raise HypervisorError(f"{self.label}: image slot {slot}: add-fd answered {added!r}")
        self._generation += 1
        node = f"{root_slot_node(slot)}-img{self._generation}"
        try:
            await qmp.execute("blockdev-add", {"driver": "file", "node-name": node, "read-only": True,
                                               "filename": f"/dev/fdset/{fdset}"})
        except BaseException:
            await qmp.execute("remove-fd", {"fdset-id": fdset})
            raise
        try:
            await self._reopen(qmp, slot, node)
        except BaseException:
            await qmp.execute("blockdev-del", {"node-name": node})
            await qmp.execute("remove-fd", {"fdset-id": fdset})
            raise
        old = self._filled.pop(slot, None)
        self._filled[slot] = _Filled(node, fdset)
        if old is not None:
            await self._drop(qmp, old)

    async def empty(self, qmp: QmpChannel, slot: int) -> None:
        """Give slot `slot` its empty (all zeros) content again. Idempotent.

        Raises:
            HypervisorError: no such slot, or QEMU refused.
        """
        self._check(slot)
        old = self._filled.get(slot)
        if old is None:
            return
        await self._reopen(qmp, slot, f"{root_slot_node(slot)}-null")
        del self._filled[slot]
        await self._drop(qmp, old)

    def filled(self) -> dict[int, str]:
        """Slot -> the block node it holds now (for inspection and tests)."""
        return {slot: f.node for slot, f in self._filled.items()}

    @staticmethod
    async def _reopen(qmp: QmpChannel, slot: int, child: str) -> None:
        await qmp.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": root_slot_node(slot), "read-only": True, "file": child}]})

    @staticmethod
    async def _drop(qmp: QmpChannel, filled: _Filled) -> None:
        await qmp.execute("blockdev-del", {"node-name": filled.node})
        # QEMU closes the fd when the node goes; remove-fd drops the set (and its dup) too
        await qmp.execute("remove-fd", {"fdset-id": filled.fdset})
