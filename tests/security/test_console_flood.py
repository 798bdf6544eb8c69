"""A guest that prints forever on its serial console cannot fill the host's /run (tmpfs: RAM)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pykata.hypervisor.busybox_initrd import write_busybox_initrd
from tests.hypervisor.test_vm import READY, STOP_BOUND, boot, kernel, make_config, make_vm, workdir  # noqa: F401

pytestmark = pytest.mark.vm

FLOOD_INIT = "#!/bin/sh\n" + READY + "while true; do echo " + "x" * 200 + "; done\n"


async def test_console_log_stays_under_its_cap_while_the_guest_prints_forever(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    initrd = write_busybox_initrd(workdir / "flood.cpio", FLOOD_INIT)
    vm = await boot(make_vm(initrd, make_config(workdir, console_log_max_kib=64)))
    logs = [vm.console_log, vm.console_log.with_name("console.log.1")]
    peak = 0
    for _ in range(20):
        await asyncio.sleep(0.25)
        peak = max(peak, sum(p.stat().st_size for p in logs if p.exists()))
    assert vm._sidecars.console is not None
    printed = vm._sidecars.console.log.written
    assert printed > 2 * 64 * 1024, f"the guest printed only {printed} bytes"
    assert peak <= 64 * 1024
    assert (await vm.qmp.execute("query-status"))["status"] == "running"
    # QEMU's own output (the guest can make it print too) goes through a drained socket as well
    assert vm.pid is not None and os.readlink(f"/proc/{vm.pid}/fd/2").startswith("socket:")
    started = time.monotonic()
    await vm.stop()
    assert time.monotonic() - started < STOP_BOUND
    assert not vm.paths.dir.exists()
