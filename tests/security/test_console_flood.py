"""A guest that prints forever on its serial console cannot fill the host's /run (tmpfs: RAM)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pykata.hypervisor.busybox_initrd import write_busybox_initrd
from tests.hypervisor.test_vm import READY, STOP_BOUND, boot, kernel, make_config, make_vm, workdir  # noqa: F401

if TYPE_CHECKING:
    from pykata.hypervisor.qemu.proxy9p import Proxy9p
    from pykata.hypervisor.qemu.virtiofsd import Virtiofsd

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
    from pykata.hypervisor.qemu.proxy9p import HELPER_LOG_MAX_BYTES

    helper, log = _fake_file_server(tmp_path, server, "printing-forever", FAKE_FILE_SERVER)
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


# A guest's console ahead of a failed boot: a forged line of the shim's log (its own line, after a
# carriage return), terminal escapes (clear the screen, set the window title), a bidi override, and
# then enough of them that the host's 3000 bytes of tail hold nothing else.
FORGED_CONSOLE = (
    "#!/bin/sh\n"
    "printf 'booting\\r\\ntime=\"2026-12-01T00:00:00Z\" level=info msg=\"PYKATA-FORGED-LINE\"\\r"
    "\\033[2J\\033[HPYKATA-FORGED-SCREEN\\342\\200\\256\\n'\n"
    "i=0; while [ $i -lt 400 ]; do printf '\\033]0;PWNED\\007\\033[2J\\r\\n'; i=$((i+1)); done\n"
    "printf '\\033[31mstill booting\\r\\n'\n"
    "%s\n"
)


def _quotes_the_console_safely(text: str) -> None:
    assert len(text) < 4000, f"{len(text)} characters"  # 3000 of the console, the host's own words
    for raw in ("\x1b", "\r", "\x07", "\u202e"):
        assert raw not in text, repr(text[:300])
    assert "\ntime=" not in text and "\nPYKATA" not in text, repr(text[:300])
    assert "still booting" in text  # the tail is still there to read, escaped


@pytest.mark.parametrize("end", ["hang", "poweroff"])
async def test_guest_not_ready_error_bounds_and_escapes_the_console(make_vm, workdir: Path, end: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The errors of a boot that failed quote the guest's console (guest not ready; QEMU exited before
    the guest was ready): they went raw into what containerd logs and hands kubelet, and the shim's and
    SDK's logs. Now escaped and bounded, as the agent's error text."""
    from pykata.errors import HypervisorError

    tail = "while true; do sleep 1000; done" if end == "hang" else "poweroff -f"
    initrd = write_busybox_initrd(workdir / f"forge-{end}.cpio", FORGED_CONSOLE % tail)
    vm = make_vm(initrd)
    await vm.prepare()
    await vm.start()
    if end == "hang":
        from pykata.hypervisor.readiness import wait_for_console_line

        await asyncio.wait_for(wait_for_console_line(vm.console_log, b"still booting"), 60)
    with pytest.raises(HypervisorError) as info:
        await vm.wait_ready(0.5 if end == "hang" else 60)
    text = str(info.value)
    assert ("not ready after" if end == "hang" else "before the guest was ready") in text, text[:300]
    _quotes_the_console_safely(text)


# A file server's last words ahead of its exit: a forged line of the shim's log, terminal escapes, a
# bidi override, then 400 more escape lines (what a guest that named a shared file so, or a hostile
# guest kernel's malformed requests, gets it to print), then one honest line.
FAKE_FAILING_FILE_SERVER = (
    "#!/bin/sh\n"
    "printf 'fv_queue_worker: bad\\r\\ntime=\"2026-12-01T00:00:00Z\" level=info msg=\"PYKATA-FORGED-LINE\"\\r"
    "\\033[2J\\033[HPYKATA-FORGED-SCREEN\\342\\200\\256\\n' >&2\n"
    "i=0; while [ $i -lt 400 ]; do printf '\\033]0;PWNED\\007\\033[2J\\r\\n' >&2; i=$((i+1)); done\n"
    "printf 'still booting\\n' >&2\n"
    "exit 1\n"
)


@pytest.mark.parametrize("server", ["virtiofsd", "virtfs-proxy-helper"])
async def test_a_failed_file_servers_output_is_quoted_bounded_and_escaped(tmp_path: Path, server: str) -> None:
    """A virtiofsd or virtfs-proxy-helper that exits at start: its error quotes the end of its log,
    which went raw into the error (virtiofsd: 2000 bytes as they were) that containerd logs and hands to
    kubelet. A FAKE server that prints forged log lines and escapes and exits 1 stands in for one a
    hostile guest made print them; pykata starts it and checks it as the real one."""
    from pykata.errors import HypervisorError

    helper, _log = _fake_file_server(tmp_path, server, "printing-escapes", FAKE_FAILING_FILE_SERVER)
    try:
        # virtiofsd's start waits 20 ms for an early exit; under load the script may take longer, and
        # then its owner's check once QEMU answers (check_running) is what reports it
        try:
            await helper.start()
        except HypervisorError as exc:
            error: HypervisorError | None = exc
        else:
            assert helper.child is not None
            assert await helper.child.wait(60) == 1
            with pytest.raises(HypervisorError) as info:
                helper.check_running()
            error = info.value
        assert error is not None
        text = str(error)
        assert "exited with code 1 at start" in text, text[:300]
        _quotes_the_console_safely(text)
    finally:
        await helper.stop()
    assert helper.child is not None and not helper.child.running


def _fake_file_server(tmp_path: Path, server: str, what: str, script: str) -> tuple[Virtiofsd | Proxy9p, Path]:
    """A FAKE `server` (virtiofsd or virtfs-proxy-helper) running `script`, set up as pykata sets up
    the real one on a fresh shared directory, and its log's path."""
    from pykata.hypervisor.qemu.proxy9p import Proxy9p
    from pykata.hypervisor.qemu.virtiofsd import Virtiofsd

    fake = tmp_path / f"fake-{server}-{what}"
    fake.write_text(script)
    fake.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    log = tmp_path / f"{server}.log"
    if server == "virtiofsd":
        return Virtiofsd(str(fake), tmp_path / "vfs.sock", shared, log), log
    return Proxy9p(shared, log, binary=str(fake), mount_namespace=False), log
