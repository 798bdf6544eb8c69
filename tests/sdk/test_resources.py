"""A sandbox's size and what it used: disk_mib bounds the container's writable layer (a tmpfs in guest
memory), metrics() reports CPU time, memory and disk use."""

from __future__ import annotations

import pytest

import pykata
from pykata.sandbox import SpecError

pytestmark = [pytest.mark.vm]


async def test_disk_size_bounds_writes_and_metrics_report_use() -> None:
    async with pykata.AsyncSandbox(disk_mib=24) as sb:
        before = await sb.metrics()
        assert before.disk_size_bytes == 24 << 20
        # no limit on the container's cgroup ("max"): None, as docker and cgroup v2 say it, not 0
        assert before.memory_limit_bytes is None
        await sb.run("head -c 8388608 /dev/zero > /data; sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'")
        after = await sb.metrics()
        assert after.disk_used_bytes - before.disk_used_bytes >= 8 << 20
        assert after.cpu_seconds > before.cpu_seconds > 0
        assert after.memory_bytes > 0 and after.pids >= 1
        with pytest.raises(pykata.SdkError, match="No space left"):
            await sb.files.write("/big", b"\0" * (20 << 20))
        await sb.files.remove("/big")
        assert (await sb.metrics()).disk_used_bytes < (10 << 20)


def test_disk_size_is_checked() -> None:
    for bad in (0, -1, 1.5):
        with pytest.raises(SpecError, match=r"^disk_mib: "):
            pykata.AsyncSandbox(disk_mib=bad)  # type: ignore[arg-type]
