"""The kernel's mount API as pykata's host mounts use it: flags, mount(2), open_tree/move_mount,
mount_setattr (with a remount walk for kernels before 5.12), and resolving a target beneath a
directory component by component with O_PATH|O_NOFOLLOW, so no symlink a guest planted is followed.
`pykata.resources.mounts` builds the sandbox's mounts on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from pathlib import Path

from pykata.errors import PykataError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# Flags a bind remount must repeat or lose (statvfs's ST_* equal the MS_* values for these).
_KEPT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | 0x10 | 0x40 | 0x400 | 0x800 | 0x200000
HARDENED = MS_NOSUID | MS_NODEV | MS_NOEXEC

# x86_64 syscall numbers of the new mount API.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
# MOUNT_ATTR_* equal MS_* for these three; MOUNT_ATTR_NOEXEC is 0x8 as well.
_MOUNT_ATTR = {MS_RDONLY: 0x1, MS_NOSUID: 0x2, MS_NODEV: 0x4, MS_NOEXEC: 0x8}

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long
# Tests turn this off to exercise the path for kernels before 5.12.
use_new_mount_api = True

PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_PRIVATE, "slave": MS_SLAVE, "rslave": MS_SLAVE,
               "shared": MS_SHARED, "rshared": MS_SHARED}


class MountError(PykataError):
    """A mount or unmount failed or was refused; `target` names the mount point."""

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"mount {target}: {message}")
        self.target = target


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def syscall(nr: int, *args: object) -> int:
    rc = int(libc.syscall(ctypes.c_long(nr), *args))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None,
           *, name: str | None = None) -> None:
    rc = libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(name or target, os.strerror(err))


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def mount_id(fd: int) -> int:
    """The kernel's id of the mount `fd` is on (as in /proc/self/mountinfo's first field)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise MountError(str(fd), "the kernel reports no mnt_id")


# -- resolving targets without following symlinks -----------------------------------------------


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p]
    for p in parts:
        if p in (".", ".."):
            raise MountError(rel, f"path component {p!r} is not allowed")
    return parts


def open_beneath(base: Path, rel: str, *, make: str | None = None, mode: int = 0o755) -> int:
    """An O_PATH fd on `base`/`rel`, opened one component at a time without following symlinks.

    `make`: "dir" or "file" creates what is missing (the last component as that kind). The caller
    closes the fd. Raises MountError when a component is a symlink or not what it must be.
    """
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    parts = _parts(rel)
    shown = base
    try:
        for i, name in enumerate(parts):
            shown = shown / name
            last = i == len(parts) - 1
            want_file = last and make == "file"
            try:
                nxt = _open_component(fd, name, want_file, make is not None, mode)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise MountError(str(shown), "is a symlink or not a directory: refused") from None
                raise MountError(str(shown), exc.strerror or str(exc)) from None
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if want_file and not stat.S_ISREG(st.st_mode):
                raise MountError(str(shown), "is a symlink or not a regular file: refused")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_component(dir_fd: int, name: str, want_file: bool, create: bool, mode: int) -> int:
    flags = _PATH_FLAGS if want_file else _PATH_FLAGS | os.O_DIRECTORY
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    if want_file:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=dir_fd))
    else:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=dir_fd)
    return os.open(name, flags, dir_fd=dir_fd)


# -- mount flags ---------------------------------------------------------------------------------


def mountinfo() -> list[tuple[int, int, str]]:
    """(mount id, parent id, mount point) of every mount of this namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append((int(fields[0]), int(fields[1]), _unescape(fields[4])))
    return out


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def set_attributes(fd: int, flags: int, *, propagation: int = 0, name: str = "") -> None:
    """Add mount `flags` (MS_RDONLY/NOSUID/NODEV/NOEXEC) to the mount at `fd` and every mount
    below it, keeping the flags each already has, and set their propagation if given.

    Raises MountError."""
    if use_new_mount_api:
        attr = _MountAttr(sum(v for k, v in _MOUNT_ATTR.items() if flags & k), 0, propagation, 0)
        try:
            syscall(SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"", ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
                     ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
            return
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise MountError(name or fd_path(fd), f"mount_setattr: {exc.strerror}") from None
    _set_attributes_walk(fd, flags, propagation, name or fd_path(fd))


def _set_attributes_walk(fd: int, flags: int, propagation: int, name: str) -> None:
    """mount_setattr(AT_RECURSIVE) for kernels before 5.12: remount the mount at `fd` and each
    sub-mount, each reached by an fd opened without following symlinks and checked by mount id."""
    infos = mountinfo()
    top = mount_id(fd)
    points = {mid: mp for mid, _, mp in infos}
    if top not in points:
        raise MountError(name, "mount not found in mountinfo")
    children: dict[int, list[int]] = {}
    for mid, parent, _ in infos:
        children.setdefault(parent, []).append(mid)
    todo, seen = [top], []
    while todo:
        mid = todo.pop()
        seen.append(mid)
        todo += [c for c in children.get(mid, []) if c != mid]
    root = points[top].rstrip("/")
    for mid in seen:
        rel = points[mid][len(root):].lstrip("/") if mid != top else ""
        sub = open_beneath(Path(fd_path(fd)), rel) if rel else os.dup(fd)
        try:
            if mount_id(sub) != mid:
                raise MountError(f"{name}/{rel}", "a sub-mount moved while being remounted: refused")
            if flags:
                kept = os.fstatvfs(sub).f_flag & _KEPT_FLAGS
                mount(None, fd_path(sub), None, MS_REMOUNT | MS_BIND | kept | flags, name=f"{name}/{rel}")
            if propagation:
                mount(None, fd_path(sub), None, propagation, name=f"{name}/{rel}")
        finally:
            os.close(sub)
