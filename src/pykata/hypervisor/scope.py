"""Landlock scoping for the VMM: what a QEMU taken over by its guest may not reach on the host even
from the host's network namespace.

A QEMU with a user-mode NIC (an SDK sandbox with network="egress") must keep the host's network
namespace: libslirp inside it opens the guest's connections as host sockets (pykata.network.egress
filters them by QEMU's uid). Abstract unix sockets belong to the network namespace, not to the file
system, so neither the chroot nor the uid hides those of other host software (a session bus, X11,
container runtimes' debug sockets); iptables does not see them. Landlock's scopes (Linux 6.12, ABI 6)
close that: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET refuses connecting to an abstract socket made outside
the process's Landlock domain, LANDLOCK_SCOPE_SIGNAL sending a signal out of it. No file-system or
network access right is handled: only the scopes. The domain is set in the child before exec (as root,
so without NO_NEW_PRIVS), and survives QEMU's -runas and the wrappers' execs.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct

_SYS_CREATE_RULESET, _SYS_RESTRICT_SELF = 444, 446  # x86_64
_CREATE_RULESET_VERSION = 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
SCOPE_ABI = 6


@functools.cache
def abi() -> int:
    """The kernel's Landlock ABI version; 0 without Landlock."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = int(libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                               ctypes.c_uint32(_CREATE_RULESET_VERSION)))
    return max(version, 0)


def supported() -> bool:
    """Whether this kernel has Landlock's scopes."""
    return abi() >= SCOPE_ABI


def confine() -> None:
    """For a preexec_fn: put this process (and what it execs) in a Landlock domain scoped against
    abstract unix sockets and signals outside it.

    Raises:
        OSError: the kernel refused (the child then fails to start).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.create_string_buffer(struct.pack("<QQQ", 0, 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL), 24)
    fd = int(libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), attr, ctypes.c_size_t(24), ctypes.c_uint32(0)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        if libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(fd)
