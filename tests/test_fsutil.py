"""fsutil: an atomic write leaves the old file or the new one (never a part, never a temp file), and a
file lock is exclusive across processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
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
