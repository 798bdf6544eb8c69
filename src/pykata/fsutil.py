"""Files: write one atomically, hold a lock on one. The one home of these helpers (import, don't copy).

Stdlib only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

KEEP_MODE = -1  # atomic_write(mode=KEEP_MODE): keep the replaced file's permission bits


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644, make_parents: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename: a reader
    sees the old file or the new one, never half of one, and a crash leaves no partial file.

    `mode` is the new file's permission bits; `KEEP_MODE` keeps those of the file it replaces
    (0o644 when there is none). Raises OSError.
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    if mode == KEEP_MODE:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dst: Path, *, make_parents: bool = True) -> None:
    """Copy `src` to `dst` the way atomic_write writes (the copy keeps `src`'s mode). Raises OSError."""
    if make_parents:
        dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def file_lock(path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock(2) on `path` (made if missing) for the block; blocks until it is free.

    Other processes using the same file wait their turn; the lock goes with the descriptor, so a
    process that dies releases it. `on_wait` is called once when another holder makes us wait (to
    say so). Raises OSError when the file cannot be opened.
    """
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.asynccontextmanager
async def async_file_lock(path: Path, *, timeout: float, poll: float = 0.05) -> AsyncIterator[None]:
    """file_lock for a coroutine: waits without blocking the event loop, at most `timeout` seconds.

    Raises TimeoutError when another holder keeps it longer, OSError when it cannot be opened.
    """
    import asyncio  # here: the shim's short-lived `start` and `delete` import this module, not asyncio

    fd = _open_lock(path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} is held by another process for over {timeout:.0f}s") from None
                await asyncio.sleep(poll)
        yield
    finally:
        os.close(fd)


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None when there is no such process (a
    zombie counts as gone: it has ended). With the pid it names one process for good: pids are reused,
    the pair never is."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (read from /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children, read from
    /proc/<pid>/task/*/children (each thread's children). Processes that end meanwhile are skipped;
    never raises."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError, ValueError):
                kids = [int(k) for k in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
                out.extend(kids)
                todo.extend(kids)
    return out


def read_all(s: socket.socket, limit: int) -> bytes:
    """What a stream socket sends until its end or `limit` bytes, whichever comes first."""
    data = b""
    while len(data) < limit:
        chunk = s.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def listen_unix(path: Path, *, backlog: int) -> socket.socket:
    """A listening unix stream socket bound at `path` (a stale file there replaced), mode 0600: only
    root connects, and pykata hands the socket to the one process meant to accept on it (QEMU, passt's
    QEMU end, virtiofsd), so that process makes no file on the host. Raises OSError (nothing left open)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
