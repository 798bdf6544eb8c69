"""mount(2) and umount2(2) through libc, and their flags: what the guest's PID 1 (pykata.agent.pid1)
needs before anything else, so it does not import the storage code (and protobuf) to get them."""

from __future__ import annotations

import ctypes
import errno
import functools
import os

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2


@functools.cache
def _libc() -> ctypes.CDLL:
    # once: a container's storages are several mounts in a row, each slow to set up under TCG
    return ctypes.CDLL(None, use_errno=True)


def libc() -> ctypes.CDLL:
    """This process's libc (errno kept for ctypes.get_errno), loaded once."""
    return _libc()


def resolve() -> None:
    """Resolve libc and the functions the agent calls through it now (the agent's start): a VM cloned
    from a template resumes this process, so its first calls (a container's storages, CreateSandbox's
    host name) only call them instead of loading them, which is slow under TCG's cold translation cache."""
    lib = _libc()
    _ = lib.mount, lib.umount2, lib.sethostname


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2). Raises OSError."""
    libc = _libc()
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                  ctypes.c_ulong(flags), data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def umount(target: str) -> None:
    """Lazy unmount; a target that is not mounted is fine."""
    libc = _libc()
    if libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
