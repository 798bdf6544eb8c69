"""Memory resize on microvm through a virtio-balloon (QMP `balloon` / `query-balloon`).

The VM boots with its ceiling (QemuConfig.balloon_memory) and the balloon holds back everything above
the VM's size. Growing deflates it, shrinking inflates it; with deflate-on-oom off the guest's MemTotal
follows. The guest runs the balloon driver, so it is untrusted: it may refuse to inflate or lie about
its progress. Nothing here relies on it for the host's safety (the host bounds QEMU with the pod's
cgroup); a guest that does not follow only makes its own resize fail with a clear error in bounded time.

Every resize holds the balloon's lock for its whole set-and-wait, so resizes of one VM run one after
the other in call order (asyncio.Lock is FIFO) and the last one to run is the last one asked for;
each QMP command goes through the VM's serialized channel, which fails every pending call at once when
the VM stops, so a resize racing a stop ends with VmExitedError instead of hanging.
"""

from __future__ import annotations

import asyncio
import time

from pykata.errors import HypervisorError
from pykata.hypervisor.errors import QmpError, VmExitedError
from pykata.hypervisor.qemu.qmp import QmpChannel

MIB = 1 << 20
# The smallest VM a resize may ask for: the guest kernel and agent need about this much.
MIN_MEMORY_MIB = 128
# How long a resize waits for the guest to reach the new size, at least, and per GiB moved. Under TCG
# on this 2-core machine the guest moved 1-2 GiB/s at load average 9 but only ~50 MiB/s at 11 while
# others' VMs ran (bench/resize_bench.py); a guest that does not follow is bounded by this, and by the
# host cgroup whatever it does.
RESIZE_TIMEOUT = 10.0
TIMEOUT_PER_GIB = 20.0
POLL = 0.05
# The guest's driver moves pages in batches; the size it reports is "there" within this much.
SLACK_MIB = 1


def inflate_timeout(moved_mib: int) -> float:
    """How long moving `moved_mib` through the balloon may take."""
    return RESIZE_TIMEOUT + TIMEOUT_PER_GIB * abs(moved_mib) / 1024


class BalloonResizeError(HypervisorError):
    """The guest did not bring its balloon to the size asked for in time (or QEMU refused)."""


class Balloon:
    """The balloon of one running VM. `ceiling_mib` is the VM's boot memory, `size_mib` the size the VM
    starts with (the balloon holds back the rest). `label` names the VM in errors ("VM <id>")."""

    def __init__(self, label: str, ceiling_mib: int, size_mib: int) -> None:
        self._label = label
        self.ceiling_mib = ceiling_mib
        self.size_mib = size_mib
        self._lock = asyncio.Lock()

    def check(self, memory_mib: int) -> None:
        """Raises HypervisorError when `memory_mib` is outside MIN_MEMORY_MIB..ceiling."""
        if isinstance(memory_mib, bool) or not isinstance(memory_mib, int):
            raise HypervisorError(f"{self._label}: memory size {memory_mib!r} is not an integer (MiB)")
        if not MIN_MEMORY_MIB <= memory_mib <= self.ceiling_mib:
            raise HypervisorError(f"{self._label}: {memory_mib} MiB is outside {MIN_MEMORY_MIB}..{self.ceiling_mib} "
                                  "MiB (the VM's ceiling is hypervisor.qemu.default_maxmemory)")

    async def resize(self, qmp: QmpChannel, memory_mib: int, timeout: float | None = None) -> int:
        """Bring the VM to `memory_mib` and wait until the guest got there; return it. Asking for the
        size the VM has is a no-op that still checks the guest is there.

        Raises:
            HypervisorError: outside MIN_MEMORY_MIB..ceiling (nothing changed).
            BalloonResizeError: the guest did not get there within `timeout` (the target stays set:
                a slow guest gets there later, a refusing one stays bounded by the host's cgroup).
            VmExitedError: the VM stopped meanwhile.
        """
        self.check(memory_mib)
        async with self._lock:
            if timeout is None:
                timeout = inflate_timeout(memory_mib - self.size_mib)
            try:
                await qmp.execute("balloon", {"value": memory_mib * MIB})
                self.size_mib = memory_mib
                actual = await self._wait(qmp, memory_mib, time.monotonic() + timeout)
            except QmpError as exc:
                if qmp.closed:
                    raise VmExitedError(f"{self._label}: stopped during a memory resize") from exc
                raise
            if abs(actual - memory_mib) > SLACK_MIB:
                raise BalloonResizeError(f"{self._label}: the guest reached {actual} of {memory_mib} MiB "
                                         f"within {timeout:.0f}s (its balloon driver is slow or refuses)")
            return memory_mib

    async def actual(self, qmp: QmpChannel) -> int:
        """The guest's memory as the balloon reports it now (MiB). Raises HypervisorError."""
        reply = await qmp.execute("query-balloon")
        value = reply.get("actual") if isinstance(reply, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HypervisorError(f"{self._label}: query-balloon answered {reply!r}")
        return value // MIB

    async def _wait(self, qmp: QmpChannel, memory_mib: int, deadline: float) -> int:
        while True:
            actual = await self.actual(qmp)
            if abs(actual - memory_mib) <= SLACK_MIB or time.monotonic() >= deadline:
                return actual
            await asyncio.sleep(POLL)
