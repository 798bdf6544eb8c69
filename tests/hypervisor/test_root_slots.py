"""Image slots against real QEMU: the host fills a slot with an image disk at run time (through the
jail: QEMU is given an fd), the guest reads it, and whatever the guest does, it cannot change the file."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pykata.config import Config
from pykata.errors import HypervisorError
from pykata.hypervisor.busybox_initrd import write_busybox_initrd
from pykata.hypervisor.readiness import wait_for_console_line
from pykata.resources.rootimage import RootImageCache, Source
from tests.guest_assets import guest_kernel_path
from tests.hypervisor.test_vm import boot, make_config
from tests.vmfactory import VmFactory

pytestmark = pytest.mark.vm

SLOT_MIB = 16
# The guest waits until slot 0 shows an ext4 superblock (after dropping its cache, as the agent does),
# reads a file from it, then attacks it: writes to the device, remounts read-write.
ATTACK = r"""#!/bin/sh
mount -t devtmpfs dev /dev
mount -t sysfs sys /sys
mkdir -p /mnt
echo "SLOTS $(cat /sys/block/vda/serial) $(cat /sys/block/vdb/serial) RO $(cat /sys/block/vda/ro)"
echo PYKATA_AGENT_READY
while true; do
  /bin/busybox blockdev --flushbufs /dev/vda
  [ "$(/bin/busybox hexdump -e '1/2 "%04x"' -s 1080 -n 2 /dev/vda)" = "ef53" ] && break
  sleep 0.1
done
mount -t ext4 -o ro /dev/vda /mnt && echo "CONTENT $(cat /mnt/hello)"
/bin/busybox blockdev --setrw /dev/vda
echo garbage | /bin/busybox dd of=/dev/vda bs=512 seek=2 conv=notrunc,fsync
echo "DD-EXIT $?"
mount -o remount,rw /mnt
echo "REMOUNT-EXIT $?"
umount /mnt
echo GUEST-DONE
while true; do sleep 1000; done
"""


def _slot_config(workdir: Path) -> Config:
    base = make_config(workdir)
    return dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, rootfs_block_slots=2,
                                                                 rootfs_block_max_mib=SLOT_MIB))


def _open_fds_on(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            continue
    return found


async def test_guest_reads_a_filled_slot_and_cannot_write_it(vm_factory: VmFactory, tmp_path: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pkslot", dir="/tmp"))  # short: unix socket paths
    try:
        await _fill_and_attack(vm_factory, workdir, tmp_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _fill_and_attack(vm_factory: VmFactory, workdir: Path, tmp_path: Path) -> None:
    config = _slot_config(workdir)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("from-the-image")
    image = RootImageCache(config.runtime).ensure(Source(tree, None, "slot-test"))
    before = hashlib.sha256(image.path.read_bytes()).hexdigest()
    initrd = write_busybox_initrd(workdir / "slots.cpio", ATTACK)
    vm = await boot(vm_factory.build(f"slots{os.getpid()}", config, initrd=initrd, kernel=guest_kernel_path()))
    assert vm.root_slots == 2
    console = vm.console_log

    with pytest.raises(HypervisorError, match="no image slot 2"):
        await vm.fill_root_slot(2, image.path)
    wrong = tmp_path / "wrong-size"
    wrong.write_bytes(b"\0" * 4096)
    with pytest.raises(HypervisorError, match="is 4096 bytes, the slot"):
        await vm.fill_root_slot(0, wrong)

    await vm.fill_root_slot(0, image.path)
    await asyncio.wait_for(wait_for_console_line(console, b"GUEST-DONE"), 60)
    text = console.read_text(errors="replace")
    assert "SLOTS pkroot0 pkroot1 RO 1" in text
    assert "CONTENT from-the-image" in text
    assert "DD-EXIT 0" not in text and "DD-EXIT" in text
    assert "REMOUNT-EXIT 0" not in text and "REMOUNT-EXIT" in text
    # emptied and refilled: the slot swaps back and forth, QEMU keeps no old node
    await vm.empty_root_slot(0)
    await vm.empty_root_slot(0)
    await vm.fill_root_slot(0, image.path)
    await vm.fill_root_slot(1, image.path)
    nodes = {n["node-name"] for n in await vm.qmp.execute("query-named-block-nodes")}
    assert sum(n.startswith("rootslot0-img") for n in nodes) == 1
    assert not _open_fds_on(image.path)  # pykata passed its fd and closed it
    await vm.stop()
    assert hashlib.sha256(image.path.read_bytes()).hexdigest() == before
