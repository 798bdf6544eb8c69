"""A boot's deadline (pykata.hypervisor.readiness.BootDeadline) does not count the time the host gave
QEMU no CPU: unit tests of the rule with a fake clock and fake starvation readings, and of the
reading itself (Starvation, from /proc/<pid>/task/*/schedstat) on real processes competing for one CPU.
tests/hypervisor/test_vm.py::test_not_ready_times_out_with_console_tail checks that an idle, hung
guest still fails at its boot_timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pykata.hypervisor.readiness import MAX_STRETCH, BootDeadline, Starvation, run_queue_waits


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_unstarved_boot_has_exactly_its_limit() -> None:
    clock = FakeClock()
    deadline = BootDeadline(30.0, lambda: 0.0, clock)
    clock.now += 29.0
    assert deadline.remaining() == pytest.approx(1.0)
    clock.now += 1.0
    assert deadline.remaining() <= 0


def test_time_starved_of_cpu_is_not_counted_up_to_the_cap() -> None:
    clock = FakeClock()
    starved = [0.0]
    deadline = BootDeadline(30.0, lambda: starved[0], clock)
    # load ~10 as measured: QEMU waited on the run queue for most of the wall time
    clock.now += 40.0
    starved[0] = 28.0
    assert deadline.remaining() == pytest.approx(18.0) and deadline.starved == 28.0
    # a reading that goes down (a thread ended) never takes back time already granted
    starved[0] = 5.0
    assert deadline.remaining() == pytest.approx(18.0)
    # starved all along (a spinning guest on a loaded host): it still ends, at MAX_STRETCH x the limit
    clock.now = 100.0 + 30.0 * MAX_STRETCH
    starved[0] = 30.0 * MAX_STRETCH
    assert deadline.remaining() <= 0


@pytest.fixture
def spinners() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Three busy loops on one CPU: each waits on the run queue about two thirds of the time."""
    cpu = min(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        for p in procs:
            os.sched_setaffinity(p.pid, {cpu})
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_starvation_is_read_from_the_kernels_run_queue_accounting(
        spinners: list[subprocess.Popen[bytes]]) -> None:
    assert run_queue_waits(spinners[0].pid), "no schedstat: the deadline would not stretch on this kernel"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        busy, idle = Starvation(spinners[0].pid), Starvation(sleeper.pid)
        started = time.monotonic()
        time.sleep(1.5)
        wall = time.monotonic() - started
        # sharing one CPU three ways it waits ~1 s of 1.5 (more on a loaded host, never less than a third)
        assert wall / 3 < busy() <= wall + 0.1
        assert idle() < 0.1  # asleep: not waiting for a CPU, so a hung idle guest is not stretched
    finally:
        sleeper.kill()
        sleeper.wait()
    assert Starvation(None)() == 0.0 and run_queue_waits(sleeper.pid) == {}
