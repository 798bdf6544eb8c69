"""When is a booted guest ready? Pluggable: the sandbox layer passes a probe (e.g. an agent health check
over ttrpc); the default watches the console log for the line the guest init prints."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pykata.errors import guest_tail

if TYPE_CHECKING:
    from pykata.hypervisor.base import Hypervisor, ReadinessProbe

READY_MARKER = b"PYKATA_AGENT_READY"
# The agent's line once the work it starts after READY_MARKER is done (pykata.agent.main SETTLED_LINE).
SETTLED_MARKER = b"PYKATA_AGENT_SETTLED"
# The agent's line once a host's session ended (pykata.agent.channel HOST_LEFT_LINE).
HOST_LEFT_MARKER = b"PYKATA_AGENT_HOST_LEFT"
# A boot's deadline stretches by the time its VMM waited for a host CPU, up to this many boot_timeouts.
MAX_STRETCH = 10.0


async def wait_for_console_line(console_log: Path, marker: bytes = READY_MARKER,
                                poll_interval: float = 0.005) -> None:
    """Return when `marker` appears in the console log. Reads only what was appended since last time;
    a log that was rotated (hypervisor.console.BoundedLog: a new file) is read from its start."""
    offset = 0
    inode = None
    tail = b""
    while True:
        try:
            with console_log.open("rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != inode:
                    inode, offset = st.st_ino, 0
                f.seek(offset)
                chunk = f.read(1 << 20)
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            window = tail + chunk
            if marker in window:
                return
            # Keep enough to find a marker split across two reads.
            tail = window[-len(marker):]
            continue
        await asyncio.sleep(poll_interval)


def console_readiness(console_log: Path, marker: bytes = READY_MARKER) -> ReadinessProbe:
    """The default probe: the readiness line on the guest console."""

    async def probe(_vm: Hypervisor) -> None:
        await wait_for_console_line(console_log, marker)

    return probe


def log_tail(path: Path, limit: int = 3000) -> str:
    """The end of a log file as text, for error messages: at most `limit` characters, escaped
    (pykata.errors.guest_tail: line ends shown as "\\n"). The guest writes its console log (and may
    prompt QEMU's messages): quoted raw, its control characters, escape sequences and forged log lines
    went into the errors containerd logs and hands to kubelet, and the shim's and SDK's logs. Never raises."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return "(no log)"
    text = data.decode(errors="replace").strip()
    return guest_tail(text, limit) if text else "(empty)"


def _schedstat(pid: int, column: int) -> dict[int, float]:
    """Column `column` of each thread's /proc/<pid>/task/<tid>/schedstat, in seconds, by thread id:
    0 the time it ran, 1 the time it waited for a CPU. {} when the kernel does not say or the process
    is gone. Never raises."""
    found: dict[int, float] = {}
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for thread in threads:
        try:
            found[int(thread.name)] = int((thread / "schedstat").read_text().split()[column]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return found


def run_queue_waits(pid: int) -> dict[int, float]:
    """Seconds each thread of process `pid` has been ready to run but waited for a CPU (the kernel's
    schedstat run_delay), by thread id; {} when the kernel does not say (no CONFIG_SCHED_INFO) or the
    process is gone. Never raises."""
    return _schedstat(pid, 1)


def cpu_seconds(pid: int) -> float:
    """Seconds all threads of process `pid` have run (schedstat, nanoseconds); 0.0 when the kernel does
    not say or the process is gone. Never raises."""
    return sum(thread_cpu_seconds(pid).values())


async def wait_quiet(pid: int, *, window: float = 0.2, busy: float = 0.004, windows: int = 2,
                     limit: float = 10.0) -> float | None:
    """Wait until process `pid` (a VMM) ran less than `busy` seconds in each of `windows` windows of
    `window` seconds in a row: its guest idles. (A guest that wants to run but is starved by a loaded
    host still gets its share of a CPU, far above `busy`.) Returns the seconds it took, None when it
    did not get quiet within `limit`. Never raises."""
    started = time.monotonic()
    last = cpu_seconds(pid)
    quiet = 0
    while time.monotonic() - started < limit:
        await asyncio.sleep(window)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now - last < busy else 0
        if quiet >= windows:
            return time.monotonic() - started
        last = now
    return None


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """Seconds each thread of process `pid` has run (schedstat), by thread id; {} when unknown. Never raises."""
    return _schedstat(pid, 0)


async def busy_breakdown(pid: int, window: float = 1.0) -> str:
    """Where a VMM's CPU went over the next `window` seconds, as text for a log line: its main loop
    (thread id = pid: devices, timers, I/O) apart from its other threads (under TCG mostly the vCPUs, which
    run the guest's code). Never raises."""
    before = thread_cpu_seconds(pid)
    await asyncio.sleep(window)
    return breakdown_since(pid, before, window)


def breakdown_since(pid: int, before: dict[int, float], window: float) -> str:
    """busy_breakdown's text for the `window` seconds since `before` (thread_cpu_seconds(pid) then), with
    no wait. Never raises."""
    after = thread_cpu_seconds(pid)
    window = max(window, 1e-3)
    ran = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main = ran.pop(pid, 0.0)
    return (f"QEMU ran {1000 * (main + sum(ran.values())) / window:.0f} ms per s: main loop "
            f"{1000 * main / window:.0f}, other threads (vCPUs) {1000 * sum(ran.values()) / window:.0f}")


class Starvation:
    """How long the most starved thread of process `pid` (QEMU: a vCPU or its main loop) has waited for
    a host CPU since this object was made: the time a loaded host took from its boot."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._base = run_queue_waits(pid) if pid is not None else {}

    def __call__(self) -> float:
        if self.pid is None:
            return 0.0
        now = run_queue_waits(self.pid)
        return max((wait - self._base.get(tid, 0.0) for tid, wait in now.items()), default=0.0)


class BootDeadline:
    """When a booting guest has had its time: `limit` seconds (boot_timeout), not counting the time its
    VMM was ready to run but the host gave it no CPU (`starved()`), and never more than MAX_STRETCH x
    `limit` in all.

    Why not wall time: under TCG a boot is CPU-bound (measured at load 10: 14.2 s to ready, of which
    QEMU ran 4.2 CPU-s and its threads waited 12.1 s on the run queue), so on a loaded host a healthy
    guest misses a wall-clock boot_timeout that an idle host meets five times over. A guest that hangs
    idle (halted, waiting on nothing) or a QEMU that hangs is not starved: it fails at `limit` as before;
    one that spins fails at `limit` on an idle host and by the cap on a loaded one.
    """

    def __init__(self, limit: float, starved: Callable[[], float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._starved = starved
        self._clock = clock
        self.started = clock()
        self.starved = 0.0  # as of the last remaining()

    def elapsed(self) -> float:
        return self._clock() - self.started

    def remaining(self) -> float:
        """Seconds left (<= 0: the boot is over time)."""
        self.starved = max(self.starved, self._starved())
        return min(self.limit + self.starved, self.limit * MAX_STRETCH) - self.elapsed()
