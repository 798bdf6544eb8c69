"""The 9p proxy helper's start: QEMU is not held back waiting for it, and one that dies at once is
still reported with a clear error (by the driver once QEMU answers: Sidecars.check_running)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pykata.errors import HypervisorError
from pykata.hypervisor.qemu.proxy9p import Proxy9p


async def test_a_helper_that_exits_at_once_is_reported_not_waited_for(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    # A fake helper: /bin/false stands in for a virtfs-proxy-helper that refuses its arguments.
    proxy = Proxy9p(shared, tmp_path / "proxy.log", binary="/bin/false", mount_namespace=False)
    started = time.monotonic()
    await proxy.start()
    assert time.monotonic() - started < 5  # no fixed pause before QEMU may start
    assert proxy.qemu_fd is not None
    try:
        assert proxy.child is not None
        await proxy.child.wait(5)
        with pytest.raises(HypervisorError, match="9p proxy helper exited with code 1 at start"):
            proxy.check_running()
    finally:
        await proxy.stop()
    assert proxy.qemu_fd is None


async def test_a_running_helper_passes_the_check(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    proxy = Proxy9p(shared, tmp_path / "proxy.log", mount_namespace=False)
    await proxy.start()
    try:
        await asyncio.sleep(0.05)
        proxy.check_running()
    finally:
        await proxy.stop()
