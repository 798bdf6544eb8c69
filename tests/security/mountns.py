"""Run a test body in a private mount namespace, so a mount that lands in the wrong place (the
attacks these tests perform) cannot touch this machine's mounts."""

from __future__ import annotations

import ctypes
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} {target}: {os.strerror(err)}")


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted on `path`, from the mount table (os.path.ismount misses a bind
    from the same file system)."""
    from pykata.resources.mounts import mounts_under

    return Path(path) in mounts_under(Path(path))


def make_shared_host_root(path: str) -> None:
    """A tmpfs at `path` that stands for the host's root file system as systemd leaves it: a shared
    mount (one peer group with every mount namespace copied from it)."""
    mount("tmpfs", path, "tmpfs", 0, "mode=0755")
    mount("none", path, None, MS_SHARED)


def in_private_mount_ns(body: Callable[[], None]) -> None:
    """Run `body` in a forked child in a new mount namespace whose mounts are all private; fail the
    calling test with the child's traceback if it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 0
        try:
            os.close(r)
            if _libc.unshare(CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
            mount("none", "/", None, MS_REC | MS_PRIVATE)
            body()
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        pytest.fail(f"in the private mount namespace:\n{report}", pytrace=False)
