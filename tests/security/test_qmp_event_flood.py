"""A guest that makes QEMU send QMP events without end cannot make the host keep them.

qemu.qmp's client kept every event QEMU sent in its default all-events listener's queue, which nobody
reads, and every listener kept a history of each event it accepted, so the host process that owns the
VM (a pod's shim, the SDK's user, `pykata run`) held each event for the VM's whole life. The guest
decides how many there are: root in the guest opening and closing its agent port makes a
VSERPORT_CHANGE (QEMU sends at most one a second per port: ~1 KiB a second for as long as the pod
lives), and a guest kernel that writes to a read-only image slot makes one BLOCK_IO_ERROR per write,
which QEMU does not throttle at all.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import pytest
from qemu.qmp.message import Message

from pykata.hypervisor.busybox_initrd import write_busybox_initrd
from pykata.hypervisor.qemu.qmp import QmpEvent
from tests.hypervisor.test_vm import READY, STOP_BOUND, boot, kernel, make_config, make_vm, workdir  # noqa: F401

pytestmark = pytest.mark.vm

# Guest root (no agent here: the port is free) opening and closing the agent's port without pause.
FLOOD_INIT = (
    "#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n"
    "p=/dev/$(basename $(dirname $(grep -l agent.channel.0 /sys/class/virtio-ports/*/name)))\n"
    + READY
    + "while :; do exec 3<>$p; exec 3>&-; done\n"
)
EVENTS = 8  # VSERPORT_CHANGE events pykata must have seen (QEMU sends about one a second)
FLOOD_LIMIT = 120.0  # seconds to get there on a loaded 2-core TCG host


def _qmp_messages() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Message))


async def test_the_host_keeps_no_qmp_event_the_guest_makes(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    seen: list[QmpEvent] = []
    initrd = write_busybox_initrd(workdir / "eventflood.cpio", FLOOD_INIT)
    before = _qmp_messages()
    vm = await boot(make_vm(initrd, make_config(workdir), on_event=seen.append))
    deadline = time.monotonic() + FLOOD_LIMIT
    while len([e for e in seen if e.name == "VSERPORT_CHANGE"]) < EVENTS and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    # the control: the guest's events reached pykata (its subscribers and on_event still get them)
    changes = [e for e in seen if e.name == "VSERPORT_CHANGE"]
    assert len(changes) >= EVENTS, f"pykata saw {len(changes)} VSERPORT_CHANGE events in {FLOOD_LIMIT:.0f} s"
    assert all(e.data.get("id") == "agent.port" for e in changes)
    held = _qmp_messages() - before
    assert (await vm.qmp.execute("query-status"))["status"] == "running"
    started = time.monotonic()
    await vm.stop()
    assert time.monotonic() - started < STOP_BOUND
    assert held <= 1, f"the host holds {held} QMP messages after {len(changes)} events the guest made"
