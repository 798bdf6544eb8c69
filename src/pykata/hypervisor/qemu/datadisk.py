"""The data disk of a running VM (cmdline.DataDisk): a file of the host's behind it for one transfer.

Like an image slot (hypervisor.qemu.slots) but writable: pykata passes the fd of a file it made
(`add-fd`: a jailed QEMU cannot open host paths), adds a `file` node on /dev/fdset/N and
`blockdev-reopen`s the disk's raw node onto it; detaching reopens it onto its null-co node and
deletes the file node, after which QEMU holds no descriptor of the file. The file must be exactly
the disk's size: the guest then reaches those bytes and no others (QEMU refuses requests past the
end of the disk, and never grows the file), so a guest can at most fill that file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pykata.errors import HypervisorError
from pykata.hypervisor.qemu.launch import DATA_DISK_NODE
from pykata.hypervisor.qemu.qmp import QmpChannel


@dataclass
class DataDisk:
    """The data disk of one VM; `label` names the VM in errors, `size` is 0 when it has none."""

    label: str
    size: int
    _attached: tuple[str, int] | None = None  # (file node, fdset) while a file is behind the disk
    _generation: int = 0

    @property
    def attached(self) -> bool:
        return self._attached is not None

    async def attach(self, qmp: QmpChannel, fd: int) -> None:
        """Put the file open at `fd` (read-write, exactly `size` bytes) behind the disk.

        Raises:
            HypervisorError: no data disk, one already attached, the file is not the disk's size,
                or QEMU refused (the disk is then as it was).
        """
        if not self.size:
            raise HypervisorError(f"{self.label}: no data disk (runtime.data_disk_mib = 0)")
        if self._attached is not None:
            raise HypervisorError(f"{self.label}: the data disk is in use")
        size = os.fstat(fd).st_size
        if size != self.size:
            raise HypervisorError(f"{self.label}: data disk file is {size} bytes, the disk {self.size}")
        added = await qmp.execute("add-fd", {}, fd=fd)
        fdset = added.get("fdset-id") if isinstance(added, dict) else None
        if not isinstance(fdset, int):
            raise HypervisorError(f"{self.label}: data disk: add-fd answered {added!r}")
        self._generation += 1
        node = f"{DATA_DISK_NODE}-file{self._generation}"
        try:
            await qmp.execute("blockdev-add", {"driver": "file", "node-name": node, "filename": f"/dev/fdset/{fdset}"})
        except BaseException:
            await qmp.execute("remove-fd", {"fdset-id": fdset})
            raise
        try:
            await self._reopen(qmp, node)
        except BaseException:
            await qmp.execute("blockdev-del", {"node-name": node})
            await qmp.execute("remove-fd", {"fdset-id": fdset})
            raise
        self._attached = (node, fdset)

    async def detach(self, qmp: QmpChannel) -> None:
        """Put the empty null node back behind the disk; QEMU closes the file. Idempotent.

        Raises:
            HypervisorError: QEMU refused.
        """
        if self._attached is None:
            return
        node, fdset = self._attached
        await self._reopen(qmp, f"{DATA_DISK_NODE}-null")
        self._attached = None
        await qmp.execute("blockdev-del", {"node-name": node})
        await qmp.execute("remove-fd", {"fdset-id": fdset})

    @staticmethod
    async def _reopen(qmp: QmpChannel, child: str) -> None:
        await qmp.execute("blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": DATA_DISK_NODE, "read-only": False, "file": child}]})
