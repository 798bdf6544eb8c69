"""Host mounts a sandbox makes under its directory (container rootfs overlays, volume binds), through
mount(2) directly: a sandbox makes several per container and a `mount` process each would cost more
than the call."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pykata.errors import PykataError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class MountError(PykataError):
    """A mount or unmount failed; `target` names the mount point."""

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"mount {target}: {message}")
        self.target = target


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(target, os.strerror(err))


def bind(source: Path, target: Path, *, readonly: bool = False) -> None:
    """Bind-mount `source` on `target` (made if missing), read-only if asked.

    Raises MountError (e.g. the source does not exist)."""
    if not source.exists():
        raise MountError(str(target), f"source {source} does not exist")
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    _mount(str(source), str(target), None, MS_BIND | MS_REC)
    if readonly:
        try:
            _mount("none", str(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
        except MountError:
            unmount(target)
            raise


def overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    """Mount an overlay of read-only `lower` with writable `upper` on `target`. Raises MountError."""
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    _mount("overlay", str(target), "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")


@dataclass(frozen=True)
class RootfsMount:
    """One mount of a container's root filesystem, as containerd's Mount message has it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


_FLAG_OPTIONS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "bind": MS_BIND,
                 "rbind": MS_BIND | MS_REC}
_IGNORED_OPTIONS = {"rw", "defaults", "suid", "dev"}


def mount_all(rootfs_mounts: Sequence[RootfsMount], target: Path) -> None:
    """Mount containerd-style root mounts on `target`, in order; undoes them all on failure.

    Raises MountError naming the mount that failed (unsupported type or option, bad source).
    """
    target.mkdir(parents=True, exist_ok=True)
    try:
        for m in rootfs_mounts:
            flags = 0
            data = []
            for opt in m.options:
                if opt in _FLAG_OPTIONS:
                    flags |= _FLAG_OPTIONS[opt]
                elif opt not in _IGNORED_OPTIONS:
                    data.append(opt)
            if m.type == "bind" or flags & MS_BIND:
                bind(Path(m.source), target, readonly=bool(flags & MS_RDONLY))
            elif m.type == "overlay":
                for opt in data:
                    if "," in opt:
                        raise MountError(str(target), f"overlay option {opt!r} has a comma")
                _mount("overlay", str(target), "overlay", flags, ",".join(data))
            else:
                raise MountError(str(target), f"unsupported root mount type {m.type!r}")
    except BaseException:
        unmount(target)
        raise


def make_shared(path: Path) -> None:
    """Make `path` a shared mount point of its own, so mounts made under it later propagate into
    mount namespaces copied from it (virtiofsd's sandbox sees volumes added after it started)."""
    _mount(str(path), str(path), None, MS_BIND | MS_REC)
    _mount("none", str(path), None, MS_SHARED | MS_REC)


def unmount(target: Path) -> bool:
    """Lazily unmount `target` and everything under it; False if nothing was mounted. Idempotent."""
    unmounted = False
    while True:
        rc = _libc.umount2(str(target).encode(), MNT_DETACH)
        if rc == 0:
            unmounted = True
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            return unmounted
        raise MountError(str(target), os.strerror(err))


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below `prefix`, deepest first (the order to unmount them)."""
    found = []
    p = str(prefix).rstrip("/")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == p or mp.startswith(p + "/"):
                found.append(Path(mp))
    return sorted(set(found), key=lambda x: len(x.parts), reverse=True)


def unmount_all(prefix: Path) -> int:
    """Unmount everything at or below `prefix`; returns how many were unmounted."""
    n = 0
    for mp in mounts_under(prefix):
        n += unmount(mp)
    return n
