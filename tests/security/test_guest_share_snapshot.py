"""A hostile guest mounts the host's shared directory (9p) behind the host's back, then the host
snapshots the sandbox, believing the share unmounted (since the lazy share the host records only the
mounts it asked for). The host must neither mount nor unmount anything for it: the snapshot fails
with a clear error (QEMU refuses to migrate a mounted 9p export), nothing of it is left, and the
sandbox runs on. The guest's root is the debug console, which only this test's configuration enables.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pykata
from pykata.config import load_config_file
from pykata.errors import PykataError
from pykata.sandbox.sandbox import SHARED_FS_TAG

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")


@pytest.fixture
def conf() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pksh", dir="/tmp"))  # short: unix socket paths
    path = d / "conf.toml"
    path.write_text(f'[runtime]\nruntime_dir = "{d}/run"\n[agent.pykata]\ndebug_console_enabled = true\n')
    yield path
    shutil.rmtree(d, ignore_errors=True)


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


@pytest.mark.vm
async def test_a_share_the_guest_mounted_secretly_fails_the_snapshot_and_nothing_else(conf: Path,
                                                                                     tmp_path: Path) -> None:
    async with pykata.AsyncSandbox(image="busybox", config=load_config_file(conf)) as sb:
        assert sb._sandbox is not None and not sb._sandbox.share_mounted
        mounts_before = [m for m in _mounts() if sb.id in m]
        # in a thread: the CLI reaches the agent through this process's proxy, served by this loop
        p = await asyncio.to_thread(subprocess.run, [PYKATA, "sandbox", "exec", sb.id, "--", "sh", "-c",
                            f"mkdir -p /tmp/m && mount -t 9p -o trans=virtio,version=9p2000.L {SHARED_FS_TAG} /tmp/m"
                            " && ls /tmp/m >/dev/null && grep -c ' /tmp/m 9p ' /proc/mounts"],
                           capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                           env={**os.environ, "PYKATA_CONFIG": str(conf)})
        assert p.returncode == 0 and p.stdout == b"1\n", (p.stdout, p.stderr)
        with pytest.raises(PykataError) as info:
            await sb.snapshot(tmp_path / "snap")
        print("snapshot refused:", info.value)
        assert "Traceback" not in str(info.value)
        assert not (tmp_path / "snap").exists() or not any((tmp_path / "snap").iterdir())
        assert [m for m in _mounts() if sb.id in m] == mounts_before  # the host mounted and unmounted nothing
        assert (await sb.run(["echo", "on"])).stdout == b"on\n"  # the sandbox runs on
