"""Tap devices for VM NICs: opened by pykata (in a pod's network namespace when asked) and handed to
QEMU as an fd, so QEMU needs no rights and the tap lives exactly as long as its last fd.

The guest side of NIC i always has the MAC `guest_mac(i)` and the QEMU id `nic_id(i)`: a VM restored
from a template carries the template's NIC, so the pod's own MAC is set by the agent afterwards
(pykata.agent.network), the same way for cold-booted and restored VMs.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pykata.errors import PykataError

TUN = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
IFNAMSIZ = 16
MAX_NICS = 8
_T = TypeVar("_T")


class NetworkError(PykataError):
    """A pod network could not be read or wired to the VM; says which step and why."""


def nic_id(index: int) -> str:
    return f"net{index}"


def guest_mac(index: int) -> str:
    # locally administered, unicast; "PK"
    return f"02:50:4b:00:00:{index + 1:02x}"


def open_tap(name: str, netns: str | None = None) -> int:
    """Create the tap `name` (in the network namespace at path `netns`, else the caller's) and return
    its fd: close-on-exec, non-persistent (the device disappears when the last fd closes), with
    virtio-net headers so QEMU can offload checksums.

    Raises:
        NetworkError: bad name, no /dev/net/tun, the namespace cannot be entered, or the name is taken.
    """
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name in (".", ".."):
        raise NetworkError(f"tap name {name!r}: at most {IFNAMSIZ - 1} bytes, no '/'")
    return _open(name) if netns is None else in_netns(netns, lambda: _open(name))


def netlink_socket(netns: str) -> int:
    """A NETLINK_ROUTE socket fd bound to the network namespace at path `netns` (a socket keeps the
    namespace it was made in), for pyroute2's `fileno=`.

    pyroute2's own `netns=` forks a child to make it; a fork of an asyncio process inherits the
    loop's signal wake-up socket, and pyroute2 ends that child with SIGTERM: the parent's loop then
    reads the child's SIGTERM as its own (the shim exited in the middle of a pod's creation).

    Raises:
        NetworkError: the namespace cannot be entered or the socket made.
    """
    def make() -> int:
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_ROUTE).detach()
        except OSError as exc:
            raise NetworkError(f"cannot make a netlink socket in {netns}: {exc.strerror}") from None

    return in_netns(netns, make)


def in_netns(netns: str, fn: Callable[[], _T]) -> _T:
    """Run `fn` in a new thread that has entered the network namespace at path `netns` (setns()
    changes only the calling thread, which ends right after) and return its result.

    Raises:
        NetworkError: the namespace cannot be entered; whatever `fn` raises (an OSError as a
            NetworkError naming the namespace).
    """
    def entered() -> _T:
        libc = ctypes.CDLL(None, use_errno=True)
        ns = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(ns, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetworkError(f"cannot enter network namespace {netns}: {os.strerror(err)}")
        finally:
            os.close(ns)
        return fn()

    try:
        return _in_own_thread(entered, "in-netns")
    except OSError as error:
        raise NetworkError(f"network namespace {netns}: {error.strerror or error}") from None


def new_netns() -> int:
    """A new, empty network namespace (loopback only, down), returned as an fd (close-on-exec) that
    holds it: the namespace ends when that fd and everything made in it (sockets, a tap's file) are
    closed, so a killed holder leaves nothing behind (no bind mount, nothing in `ip netns`). Its path
    for in_netns() and netlink_socket() is ns_path(fd).

    Raises:
        NetworkError: unshare(CLONE_NEWNET) is refused.
    """
    def make() -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:  # this thread only; it ends right after
            raise NetworkError(f"cannot make a network namespace: {os.strerror(ctypes.get_errno())}")
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    try:
        return _in_own_thread(make, "new-netns")
    except NetworkError:
        raise
    except Exception as error:
        raise NetworkError(f"cannot make a network namespace: {error}") from None


def _in_own_thread(fn: Callable[[], _T], name: str) -> _T:
    """`fn()` run in a thread of its own, which ends with it (what it did to its thread, such as
    entering a namespace, ends too); its result, or what it raised, raised here."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    value: _T = result["value"]
    return value


def ns_path(fd: int) -> str:
    """A path naming the network namespace held by this process's `fd` (valid while the fd is open)."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def _open(name: str) -> int:
    try:
        fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open {TUN}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"cannot create tap {name}: {exc.strerror}") from None
    return fd
