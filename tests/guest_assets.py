"""The guest kernel and root filesystem tests boot: pykata's cached builds, shared by test packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata.guestimage.kernel import DEFAULT_CACHE_DIR, build_kernel, find_kernel
from pykata.guestimage.rootfs import find_rootfs
from pykata.hypervisor.qemu.assets import without_symbols


def guest_kernel_path() -> Path:
    """The guest kernel as QEMU is given it: pykata's cached build without its symbol table (QEMU would
    sort its 48,000 symbols at each start; assets.without_symbols). $PYKATA_TEST_KERNEL overrides it.
    """
    override = os.environ.get("PYKATA_TEST_KERNEL")
    if override:
        return Path(override)
    return without_symbols(guest_kernel_with_symbols())


def guest_kernel_with_symbols() -> Path:
    """The guest kernel pykata builds (cached), whole; built here if the cache is empty (takes minutes)."""
    found = find_kernel()
    if found is not None:
        return found.vmlinux
    # The driver boots any kernel: while a rebuild for changed inputs runs, the last build will do.
    last = DEFAULT_CACHE_DIR / "kernel"
    try:
        previous = last / (last / "current").read_text().strip() / "vmlinux"
    except OSError:
        previous = None
    if previous is not None and previous.is_file():
        return previous
    return build_kernel().vmlinux


def guest_initrd_path() -> Path:
    """The cached guest root filesystem; while a rebuild for changed agent sources is pending, the
    newest build in the cache will do (templating does not depend on the agent's version)."""
    found = find_rootfs(Path("/var/cache/pykata"))
    if found is not None and found.initrd is not None:
        return Path(found.initrd)
    builds = sorted(Path("/var/cache/pykata/rootfs").glob("*/rootfs.cpio"), key=lambda p: p.stat().st_mtime)
    if not builds:
        pytest.fail("no guest root filesystem: run `pykata image build`")
    return builds[-1]
