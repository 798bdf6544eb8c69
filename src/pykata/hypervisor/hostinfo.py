"""Facts about the host that shape the guest's command line."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

_TSC_LINE = re.compile(rb"tsc: Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz")
_TSC_LINE_DETECTED = re.compile(rb"tsc: Detected (\d+)\.(\d{3}) MHz processor")


def parse_tsc_khz(kernel_log: bytes) -> int | None:
    """The host TSC frequency (kHz) from kernel log text; the refined value wins over the early one."""
    refined = _TSC_LINE.findall(kernel_log)
    if refined:
        mhz, frac = refined[-1]
        return int(mhz) * 1000 + int(frac)
    detected = _TSC_LINE_DETECTED.findall(kernel_log)
    if detected:
        mhz, frac = detected[-1]
        return int(mhz) * 1000 + int(frac)
    return None


def _read_kmsg(limit: int = 4 << 20) -> bytes:
    """The kernel log ring via /dev/kmsg (non-blocking), or b"" without permission."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    chunks: list[bytes] = []
    total = 0
    try:
        while total < limit:
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:
                # EPIPE: a record was overwritten while reading; go on with the next one.
                continue
            if not chunk:
                break
            chunks.append(chunk.split(b";", 1)[-1])
            total += len(chunk)
    finally:
        os.close(fd)
    return b"\n".join(chunks)


def _cpuinfo_khz(cpuinfo: str) -> int | None:
    """"cpu MHz" is the TSC frequency only when the kernel says the TSC rate is known and fixed."""
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if not flags or not mhz:
        return None
    names = flags.group(1).split()
    if "tsc_known_freq" not in names or "constant_tsc" not in names:
        return None
    return round(float(mhz.group(1)) * 1000)


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, or None if it cannot be known for sure.

    Under TCG the guest reads the host's TSC directly, but has neither kvmclock nor a reliable timer to
    calibrate it against: on a busy host the calibration fails and the guest hangs at boot. Telling the
    guest the frequency (tsc_early_khz=) removes that failure.
    """
    found = parse_tsc_khz(_read_kmsg())
    if found:
        return found
    try:
        return _cpuinfo_khz(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
