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
import struct
import threading

from pykata.errors import PykataError

TUN = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
MAX_NICS = 8


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
    if netns is None:
        return _open(name)
    result: dict[str, int | BaseException] = {}

    def in_netns() -> None:
        # setns() changes only this thread's namespace; the thread ends right after.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ns = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(ns, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetworkError(f"cannot enter network namespace {netns}: {os.strerror(err)}")
            finally:
                os.close(ns)
            result["fd"] = _open(name)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    t = threading.Thread(target=in_netns, name=f"tap-{name}")
    t.start()
    t.join()
    error = result.get("error")
    if isinstance(error, OSError):
        raise NetworkError(f"network namespace {netns}: {error.strerror or error}") from None
    if isinstance(error, BaseException):
        raise error
    fd = result["fd"]
    assert isinstance(fd, int)
    return fd


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
