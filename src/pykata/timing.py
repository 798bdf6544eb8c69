"""Phase marks for bench/phases.py: where the wall time of a pod start and teardown goes.

`mark("vm.started")` appends one line `<CLOCK_MONOTONIC ns> <pid> <name>` to the file named by the
environment variable PYKATA_TIMING_FILE (containerd passes its environment to the shims it runs).
Without that variable a mark is one dictionary lookup: nothing is written, nothing can fail. A mark
never raises (the file is a benchmark's scratch file, not state anyone relies on).
"""

from __future__ import annotations

import os
import time

ENV = "PYKATA_TIMING_FILE"


def mark(name: str, at_ns: int | None = None) -> None:
    """Record that `name` happened now (or at `at_ns`, CLOCK_MONOTONIC nanoseconds)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = f"{time.monotonic_ns() if at_ns is None else at_ns} {os.getpid()} {name}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, line)  # one short O_APPEND write: lines of concurrent processes never interleave
    except OSError:
        pass
    finally:
        os.close(fd)


def process_start_ns() -> int | None:
    """When this process was exec'd, on the CLOCK_MONOTONIC scale (clock-tick resolution, 10 ms), so
    interpreter start-up and imports before the first mark can be measured; None if unreadable."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: field 22 of stat, counted from the field after the name
        boot_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        mono_ns = time.monotonic_ns()
    except (OSError, ValueError, IndexError):
        return None
    return mono_ns - (boot_ns - ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK"))
