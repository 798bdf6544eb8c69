"""Ending a QEMU that cannot be asked to quit (its QMP channel not connected yet: a VM stopped while it
still restores, as the SDK's Pool does on close) kills it at once, without a warning."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from pykata.config import load_config
from pykata.hypervisor.process import ChildProcess
from pykata.hypervisor.qemu.driver import QUIT_TIMEOUT, QemuHypervisor
from pykata.hypervisor.qemu.qmp import QmpChannel


async def test_a_vm_whose_qmp_is_not_connected_is_killed_at_once(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    vm = QemuHypervisor("end-qemu-test", load_config(), vm_dir=tmp_path / "vm")
    vm._qmp = QmpChannel(tmp_path / "none.sock", name="end-qemu-test")  # made, never connected
    # a stand-in for QEMU: a real child that would wait forever to be asked
    child = await ChildProcess.spawn(["sleep", "600"], name="qemu-stand-in", log_path=tmp_path / "log")
    try:
        started = time.monotonic()
        with caplog.at_level(logging.DEBUG, logger="pykata"):
            await vm._end_qemu(child)
        assert not child.running
        assert time.monotonic() - started < QUIT_TIMEOUT  # no wait for a quit that was never sent
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert "QMP quit failed" in caplog.text
    finally:
        await child.kill()
        await vm._qmp.close()
