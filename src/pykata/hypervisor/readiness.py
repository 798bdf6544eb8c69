"""When is a booted guest ready? Pluggable: the sandbox layer passes a probe (e.g. an agent health check
over ttrpc); the default watches the console log for the line the guest init prints."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pykata.hypervisor.base import Hypervisor, ReadinessProbe

READY_MARKER = b"PYKATA_AGENT_READY"


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
    """The end of a log file as text, for error messages (never raises)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return "(no log)"
    text = data.decode(errors="replace").replace("\r", "").strip()
    return text or "(empty)"
