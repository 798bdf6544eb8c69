"""fsutil: an atomic write leaves the old file or the new one (never a part, never a temp file), a
file lock is exclusive across processes, and a unix socket pykata hands to QEMU or a daemon listens at
mode 0600."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from pykata import fsutil


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f"
    fsutil.atomic_write(path, "one")
    fsutil.atomic_write(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o600
    fsutil.atomic_write(path, "three", mode=fsutil.KEEP_MODE)
    assert path.read_text() == "three" and path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(path.parent) == ["f"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fsutil.atomic_write(path, "old")

    with pytest.raises(TypeError):  # fails after the temporary file was made
        fsutil.atomic_write(path, 123)  # type: ignore[arg-type]
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_atomic_copy_keeps_the_mode(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_text("data")
    src.chmod(0o750)
    fsutil.atomic_copy(src, tmp_path / "d" / "dst")
    dst = tmp_path / "d" / "dst"
    assert dst.read_text() == "data" and dst.stat().st_mode & 0o777 == 0o750


def _hold(path: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    with fsutil.file_lock(Path(path)):
        ready.set()
        release.wait(10)


def test_file_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / ".lock"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(lock), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        waited: list[bool] = []
        with pytest.raises(TimeoutError):
            asyncio.run(_try_async(lock, 0.2))
        started = time.monotonic()
        threading.Timer(0.3, release.set).start()
        with fsutil.file_lock(lock, on_wait=lambda: waited.append(True)):
            assert time.monotonic() - started >= 0.2
        assert waited == [True]
    finally:
        release.set()
        holder.join(10)
    assert holder.exitcode == 0
    asyncio.run(_try_async(lock, 1.0))  # free again


async def _try_async(lock: Path, timeout: float) -> None:
    async with fsutil.async_file_lock(lock, timeout=timeout, poll=0.02):
        pass


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_listen_unix_makes_a_0600_listening_socket_replacing_a_stale_one(tmp_path: Path) -> None:
    """The one helper of QEMU's QMP and agent sockets, passt's QEMU end and virtiofsd's socket."""
    path = tmp_path / "vm.sock"
    path.write_text("a stale file")  # a crashed VM's socket, here a file
    before = _open_fds()
    sock = fsutil.listen_unix(path, backlog=2)
    try:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            accepted, _ = sock.accept()
            accepted.close()
    finally:
        sock.close()
    assert _open_fds() == before
    with pytest.raises(OSError):  # a directory that does not exist: the error, and nothing left open
        fsutil.listen_unix(tmp_path / "missing" / "vm.sock", backlog=1)
    assert _open_fds() == before


async def test_virtiofsd_that_cannot_listen_fails_naming_its_socket(tmp_path: Path) -> None:
    """virtiofsd's start raised a bare OSError when its socket could not be bound; now a HypervisorError
    naming it, as passt's and QEMU's sockets (no daemon is started: the binary is never run)."""
    from pykata.errors import HypervisorError
    from pykata.hypervisor.qemu.virtiofsd import Virtiofsd

    shared = tmp_path / "shared"
    shared.mkdir()
    socket_path = tmp_path / "missing" / "vfs.sock"
    helper = Virtiofsd("/usr/lib/qemu/virtiofsd", socket_path, shared, tmp_path / "vfs.log")
    with pytest.raises(HypervisorError, match=f"^virtiofsd: cannot listen on {socket_path}: No such file"):
        await helper.start()
    assert helper.child is None
    await helper.stop()  # idempotent after a failed start
