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


FAKE_FILE_SERVER = "#!/bin/sh\nwhile :; do echo 'fv_queue_worker: elem 0: bad descriptor chain' >&2; done\n"


@pytest.mark.parametrize("server", ["virtiofsd", "virtfs-proxy-helper"])
async def test_file_server_output_stays_under_its_cap(tmp_path: Path, server: str) -> None:
    """virtiofsd and virtfs-proxy-helper print to the host too (an error line per malformed request
    a hostile guest kernel, or a compromised QEMU, can send): their output goes through a drained
    socket into a bounded log, as QEMU's. A FAKE server that prints forever stands in for one made
    to (the real ones need a hostile guest kernel to print); pykata starts and stops it as the real one."""
    from pykata.hypervisor.qemu.proxy9p import HELPER_LOG_MAX_BYTES, Proxy9p
    from pykata.hypervisor.qemu.virtiofsd import Virtiofsd

    fake = tmp_path / f"fake-{server}-printing-forever"
    fake.write_text(FAKE_FILE_SERVER)
    fake.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    log = tmp_path / f"{server}.log"
    helper: Virtiofsd | Proxy9p
    if server == "virtiofsd":
        helper = Virtiofsd(str(fake), tmp_path / "vfs.sock", shared, log)
    else:
        helper = Proxy9p(shared, log, binary=str(fake), mount_namespace=False)
    await helper.start()
    try:
        peak = 0
        for _ in range(12):
            await asyncio.sleep(0.25)
            peak = max(peak, sum(p.stat().st_size for p in (log, log.with_name(log.name + ".1")) if p.exists()))
        assert helper.child is not None and helper.child.running
        assert helper._log is not None and helper._log.log.written > 2 * HELPER_LOG_MAX_BYTES
        assert 0 < peak <= HELPER_LOG_MAX_BYTES
    finally:
        await helper.stop()
    assert helper.child is not None and not helper.child.running
