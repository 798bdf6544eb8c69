"""A mount namespace whose root holds only the host's programs (read-only) and one served directory:
where virtfs-proxy-helper runs, so that no descriptor it hands to a jailed QEMU leads out of the share.

Why: the helper chroots into the shared directory, opens what QEMU asks for there and hands QEMU the
descriptor (SCM_RIGHTS): every directory the guest opens becomes a directory descriptor in QEMU. The
kernel walks `..` from a descriptor in the mount tree the descriptor belongs to, up to that tree's
root: a chroot stops only the process whose root it is, and QEMU's root is its own empty chroot. So a
QEMU taken over by its guest walked from such a descriptor up to the host's `/` (as its jail uid: the
world-readable files, /proc, /tmp and /dev/shm to fill, unix sockets to connect to). In the helper's
own mount namespace, its root is now a read-only tmpfs with /usr bound read-only (the helper, the
wrappers and their libraries), the usr-merge links (or binds of /bin, /lib, ... where they are
directories), a copy of /etc/ld.so.cache, and the shared directory bound at its own path (recursive
and a slave of the host's mounts: containers' roots and volumes mounted there later still arrive).
`..` from any descriptor ends at that root.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 1, 2, 4, 32, 4096, 16384, 1 << 19
MNT_DETACH = 2
_SYS_PIVOT_ROOT = 155  # x86_64

# Top-level directories a program (and its dynamic loader) may come from: bound read-only, or the
# same symlink where they are links (a merged /usr).
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32")
LD_CACHE = "/etc/ld.so.cache"


def enter_step(root: Path, shared_dir: Path, binary: str) -> Callable[[], None]:
    """A preexec step (after fork, before exec): a new mount namespace whose root is a tmpfs mounted
    on `root` (an empty directory of the host, left untouched there) holding SYSTEM_DIRS, the loader's
    cache, `binary` (bound at its path when it is outside SYSTEM_DIRS) and `shared_dir` at its own
    path; then pivot_root into it, the host's tree detached.

    The step raises OSError (the child then fails to start, which ChildProcess.spawn reports)."""
    shared = os.fsencode(shared_dir)
    top = os.fsencode(root)
    program = os.fsencode(os.path.realpath(binary))

    def step() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long

        def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
                  data: bytes | None = None) -> None:
            if libc.mount(source, target, fstype, ctypes.c_ulong(flags), data) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount {target!r}: {os.strerror(err)}")

        def bind_read_only(source: bytes, target: bytes) -> None:
            mount(source, target, None, MS_BIND | MS_REC)
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

        try:
            with open(LD_CACHE, "rb") as f:
                ld_cache: bytes | None = f.read()
        except OSError:
            ld_cache = None
        if libc.unshare(CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
        # what the host mounts later (containers' roots, volumes) still arrives; nothing goes back
        mount(None, b"/", None, MS_REC | MS_SLAVE)
        mount(b"pykata-helper-root", top, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=4m")
        for name in SYSTEM_DIRS:
            source = b"/" + name.encode()
            if os.path.islink(source):
                os.symlink(os.readlink(source), top + source)
            elif os.path.isdir(source):
                os.mkdir(top + source, 0o755)
                bind_read_only(source, top + source)
        if ld_cache is not None:
            os.makedirs(top + b"/etc", 0o755, exist_ok=True)
            with open(top + LD_CACHE.encode(), "wb") as out:
                out.write(ld_cache)
        if not any(program.startswith(b"/" + d.encode() + b"/") for d in SYSTEM_DIRS):
            os.makedirs(os.path.dirname(top + program), 0o755, exist_ok=True)
            with open(top + program, "wb"):
                pass
            bind_read_only(program, top + program)
        os.makedirs(top + shared, 0o755, exist_ok=True)
        mount(shared, top + shared, None, MS_BIND | MS_REC)
        mount(None, top, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(top)
        if libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), b".", b".") != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pivot_root: {os.strerror(err)}")
        # the host's tree, now stacked on "." by pivot_root, goes: `..` ends at the tmpfs
        if libc.umount2(b".", MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount of the old root: {os.strerror(err)}")
        os.chdir("/")

    return step
