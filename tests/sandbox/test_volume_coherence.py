"""A read-write host volume stays coherent with the host and durable when the VM dies, over 9p (a
templated VM, `hypervisor.qemu.virtio_9p_cache = "mmap"`, the default) and over virtio-fs (a cold boot,
`hypervisor.qemu.virtio_fs_cache = "auto"`, the default): the container maps a file MAP_SHARED, sees
the host's in-place writes (on a descriptor it keeps, on a new open, in its mapping), appends, new,
removed and listed names within STALE_MS, and what it msyncs or fsyncs is on the host after QEMU is
killed (tests/sandbox/coherence.py has the probe; bench/vfs_cache_bench.py compares the cache modes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.config import load_config, with_shared_fs
from tests.sandbox.coherence import build_probe, probe_volume

pytestmark = [pytest.mark.vm]

CHECKS = {"open descriptor reads the host's write", "a new open reads the host's write", "stat sees the host's append",
          "a name the host made", "a name the host removed", "readdir lists the host's new file",
          "a MAP_SHARED mapping sees the host's write"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_probe(tmp_path_factory.mktemp("probe"))


@pytest.mark.parametrize("shared_fs", ["virtio-9p", "virtio-fs"])
async def test_volume_coherent_with_host_and_durable_when_the_vm_dies(probe: Path, shared_fs: str) -> None:
    config = load_config()
    assert config.factory.enable_template and config.qemu.virtio_9p_cache == "mmap"
    assert config.qemu.virtio_fs_cache == "auto"
    config = with_shared_fs(config, "virtio-9p" if shared_fs == "virtio-9p" else "virtio-fs")
    result, used = await probe_volume(config, probe)
    assert used == shared_fs
    assert not result.mmap_error, result.output
    assert set(result.seen) == CHECKS, result.output
    assert all(ms is not None for ms in result.seen.values()), result.output
    assert result.durable["msync'd mapping"] and result.durable["fsync'd write"], result

