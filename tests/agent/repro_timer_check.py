"""Reproduce the guest panic "IO-APIC + timer doesn't work!" of a starved host (not a test: it loads the
host with two busy loops for at most a few minutes, and cleans them up).

    .venv/bin/python tests/agent/repro_timer_check.py [BOOTS]

Boots tests/agent/test_agent_vm.py's guest (microvm, acpi=off, 2 vCPUs, TCG), and while its kernel checks
the PIT's interrupt through the IO-APIC (check_timer: at least 5 ticks within a TSC-timed delay) puts
QEMU's main loop thread, which raises the PIT's interrupts, under SCHED_IDLE beside two busy loops: a
host too busy to run it for that delay. Without no_timer_check the guest panicked in 5 of 10 such
boots (three runs at load 16-18), with it the check is skipped: 10 of 10 went on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.guest_assets import guest_initrd_path, guest_kernel_path

PANIC = b"IO-APIC + timer doesn't work!"
HOG = "import time\nend = time.monotonic() + 300\nwhile time.monotonic() < end:\n    pass\n"


def _tsc_param() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return f"tsc_early_khz={int(float(line.split(':')[1]) * 1000)}"
    return ""


def boot(extra: str, log: Path) -> str:
    """One boot up to the end of the kernel's timer set-up: 'booted', 'panic' or what else happened."""
    log.unlink(missing_ok=True)
    argv = ["/usr/bin/qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "512", "-smp", "2", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", f"file:{log}", "-kernel", str(guest_kernel_path()),
            "-initrd", str(guest_initrd_path()), "-no-reboot",
            "-append", f"console=ttyS0 panic=-1 apic=verbose {_tsc_param()} {extra}".strip()]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    starved = done = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            text = log.read_bytes() if log.exists() else b""
            if not starved and b"pin 20 not connected" in text:  # the IO-APIC set-up, just before the check
                os.sched_setscheduler(qemu.pid, os.SCHED_IDLE, os.sched_param(0))  # the main thread only
                starved = True
            if starved and not done and b"..TIMER" in text:
                time.sleep(0.2)
                os.sched_setscheduler(qemu.pid, os.SCHED_OTHER, os.sched_param(0))
                done = True
            if PANIC in text:
                return "panic"
            if b"Kernel panic" in text:
                return "other panic"
            if qemu.poll() is not None:
                return f"exit {qemu.returncode}"
            if b"Calibrating delay loop" in text and done:
                return "booted"
            time.sleep(0.001)
        return "timeout"
    finally:
        qemu.kill()
        qemu.wait()


def main() -> None:
    boots = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
    try:
        with tempfile.TemporaryDirectory() as d:
            for extra in ("", "no_timer_check"):
                results = [boot(extra, Path(d) / "console.log") for _ in range(boots)]
                print(f"{extra or '(without no_timer_check)':26s} {results} load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    main()
