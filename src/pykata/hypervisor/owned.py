"""The processes a VM's owner started, recorded in the VM's directory, so that whoever cleans up after the
owner died (`pykata cleanup`, the next SDK process) ends exactly those.

A process is named by its pid and its start time (clock ticks since boot): a pid is reused, the pair
never is. Never by what its command line mentions: another sandbox's path may extend this one's
(sandbox ids "abc" and "abc1"), and a user's `tail /run/pykata/sandboxes/abc/vm/qemu.log` names it too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil

from pykata.fsutil import atomic_write, start_ticks

RECORDS = "pids"  # <directory>/pids/<pid> holds the process's start ticks


def record(directory: Path, pid: int) -> None:
    """Note in `directory` that this process started `pid`. Nothing when it has already ended.
    Raises OSError."""
    ticks = start_ticks(pid)
    if ticks is not None:
        (directory / RECORDS).mkdir(mode=0o700, exist_ok=True)
        atomic_write(directory / RECORDS / str(pid), str(ticks), mode=0o600, make_parents=False)


def recorded(directory: Path) -> list[psutil.Process]:
    """The processes recorded in `directory` that still run: same pid and same start time. Never raises."""
    found = []
    with contextlib.suppress(OSError):
        for entry in (directory / RECORDS).iterdir():
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                pid = int(entry.name)
                ticks = int(entry.read_text()[:32])
                if pid > 0 and start_ticks(pid) == ticks:
                    found.append(psutil.Process(pid))
    return found


def kill_recorded(directory: Path, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process recorded in `directory` that still runs, and everything below it; wait up
    to `timeout` seconds for them to end. Returns their pids. Never raises."""
    victims: dict[int, psutil.Process] = {}
    for proc in recorded(directory):
        victims[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            victims.update((c.pid, c) for c in proc.children(recursive=True))
    for proc in victims.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil checks the process is still the one it found (pid + creation time)
    psutil.wait_procs(list(victims.values()), timeout=timeout)
    return sorted(victims)
