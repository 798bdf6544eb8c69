"""The guest's serial console, drained by the host into a log of bounded size.

The guest may print forever, and the log lives on /run (tmpfs: host RAM). So QEMU does not write the
file itself: its serial port is one end of a socket pair (`-chardev socket,fd=N`) and the VM's owner
reads the other end into `BoundedLog`, which keeps at most `max_bytes` on disk (the newest output, in
`console.log` and the previous half in `console.log.1`). The drain also reads at most `rate` bytes a
second: past that it stops reading until the next second, so the guest's UART waits (QEMU's serial
device retries while the socket is full) instead of the owner's event loop spending its time on a
flood. If the owner goes away the socket closes and QEMU drops console output: nothing ever blocks
QEMU itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_RATE = 1 << 20
_READ_SIZE = 64 << 10


class BoundedLog:
    """Appends to `path`, never holding more than `max_bytes` on disk: the newest output in `path` and
    `backups` older parts of equal size in `path.1` (newer) .. `path.<backups>`. When `path` reaches
    its part it becomes `path.1` (each older one moving up, the oldest dropped) and a new `path` starts;
    with no backups it starts over empty. Default: two halves, `path` and `path.1`. Also the log of
    `pykata run` (runtime.run_log_max_size, run_log_backups)."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = 1) -> None:
        if backups < 0 or max_bytes < backups + 1 or max_bytes < 2:
            raise ValueError(f"max_bytes must be >= 2 and > backups, not {max_bytes} ({backups} backups)")
        self.path = path
        self.backups = backups
        self.half = max_bytes // (backups + 1)  # the size of each part (half with one backup)
        self.written = 0  # everything, including what was rotated away
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    @property
    def rotated(self) -> Path:
        return self.backup(1)

    def backup(self, n: int) -> Path:
        """The `n`th older part (1: the newest)."""
        return self.path.with_name(f"{self.path.name}.{n}")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._size >= self.half:
                self._rotate()
            n = min(len(view), self.half - self._size)
            os.write(self._fd, view[:n])
            self._size += n
            self.written += n
            view = view[n:]

    def _rotate(self) -> None:
        for n in range(self.backups, 1, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.backup(n - 1), self.backup(n))
        if self.backups:
            os.replace(self.path, self.rotated)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ConsoleDrain:
    """One VM's console: `guest_fd` goes to QEMU (`-chardev socket,fd=N`; close it here once QEMU
    has it, with `release_guest_end()`), then `start()` reads the other end into a BoundedLog until
    `close()`."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, rate: int = DEFAULT_RATE) -> None:
        self.log = BoundedLog(path, max_bytes)
        self.rate = rate
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host.setblocking(False)
        self._host = host
        self._guest: socket.socket | None = guest
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._window_start = 0.0
        self._window_bytes = 0
        self._resume: asyncio.TimerHandle | None = None
        self.throttled = 0  # how many times the rate limit paused reading

    @property
    def guest_fd(self) -> int:
        assert self._guest is not None, "the guest end was already handed over"
        return self._guest.fileno()

    def release_guest_end(self) -> None:
        """Close our copy of the guest end (QEMU holds its own after the spawn)."""
        if self._guest is not None:
            self._guest.close()
            self._guest = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._window_start = time.monotonic()
        self._add_reader()

    def _add_reader(self) -> None:
        self._resume = None
        if self._loop is not None and not self._reading and self._host.fileno() >= 0:
            self._loop.add_reader(self._host.fileno(), self._on_readable)
            self._reading = True

    def _remove_reader(self) -> None:
        if self._loop is not None and self._reading:
            self._loop.remove_reader(self._host.fileno())
            self._reading = False

    def _on_readable(self) -> None:
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_bytes = now, 0
        if self._window_bytes >= self.rate:
            self._remove_reader()
            self.throttled += 1
            assert self._loop is not None
            self._resume = self._loop.call_later(max(0.0, self._window_start + 1.0 - now), self._add_reader)
            return
        try:
            data = self._host.recv(min(_READ_SIZE, self.rate - self._window_bytes))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # QEMU closed its end (exited)
            self._remove_reader()
            return
        self._window_bytes += len(data)
        self._write(data)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a full /run must not break the VM's owner
            self.log.write(data)

    def flush(self) -> None:
        """Write what is already in the socket (at most one more second's worth) to the log now."""
        if self._host.fileno() < 0:
            return
        left = self.rate
        with contextlib.suppress(OSError):
            while left > 0 and (data := self._host.recv(min(_READ_SIZE, left))):
                self._write(data)
                left -= len(data)

    def close(self) -> None:
        """Flush, then stop reading and close everything. Idempotent."""
        self._remove_reader()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self.flush()
        if self._host.fileno() >= 0:
            self._host.close()
        self.release_guest_end()
        self.log.close()
