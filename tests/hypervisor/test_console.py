"""The bounded console log and its drain, without a VM (the VM case is in tests/security)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from pykata.hypervisor.console import BoundedLog, ConsoleDrain
from pykata.hypervisor.readiness import wait_for_console_line


def test_bounded_log_keeps_the_newest_output_within_the_cap(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "console.log", max_bytes=1000)
    for i in range(500):
        log.write(f"line {i:04d}\n".encode())  # 10 bytes a line, 5000 in all
    log.close()
    current, older = (tmp_path / "console.log").read_bytes(), (tmp_path / "console.log.1").read_bytes()
    assert len(current) + len(older) <= 1000 and len(older) == 500
    assert (older + current).endswith(b"line 0499\n")
    assert log.written == 5000
    with pytest.raises(ValueError):
        BoundedLog(tmp_path / "x", max_bytes=1)


async def test_drain_caps_the_file_and_the_rate(tmp_path: Path) -> None:
    """A writer far faster than the rate: the drain reads about `rate` bytes a second (the writer
    blocks on the full socket), and the file never passes the cap."""
    drain = ConsoleDrain(tmp_path / "console.log", max_bytes=64 << 10, rate=256 << 10)
    writer = socket.socket(fileno=os.dup(drain.guest_fd))
    drain.release_guest_end()
    drain.start()
    writer.setblocking(False)
    sent = 0
    chunk = b"x" * 4096 + b"\n"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while loop.time() < deadline:
        try:
            sent += writer.send(chunk)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    # the socket is full: a plain send() would fail with EAGAIN under load; wait for room like a UART
    await loop.sock_sendall(writer, b"PYKATA_AGENT_READY\n")
    await asyncio.wait_for(wait_for_console_line(tmp_path / "console.log"), 5)
    sizes = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert sizes <= 64 << 10
    assert drain.throttled >= 1
    # ~2-3 windows of 1 s at the rate, although the writer offered as much as the socket took
    assert drain.log.written <= 4 * (256 << 10)
    assert sent <= 4 * (256 << 10) + (1 << 20)  # the writer waited: at most the rate plus socket buffers
    writer.close()
    drain.close()
    drain.close()  # idempotent


def test_bounded_log_with_more_backups(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "out.log", max_bytes=300, backups=2)  # three parts of 100 bytes
    for i in range(10):
        log.write(bytes([65 + i]) * 50)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["out.log", "out.log.1", "out.log.2"]
    text = b"".join((tmp_path / n).read_bytes() for n in ("out.log.2", "out.log.1", "out.log"))
    assert text == b"".join(bytes([65 + i]) * 50 for i in range(4, 10))
    none = BoundedLog(tmp_path / "solo.log", max_bytes=100, backups=0)
    none.write(b"a" * 150)
    none.close()
    assert (tmp_path / "solo.log").read_bytes() == b"a" * 50 and not (tmp_path / "solo.log.1").exists()
