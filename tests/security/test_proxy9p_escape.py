"""A jailed QEMU taken over by its guest walks out of the 9p share through the descriptors that
virtfs-proxy-helper hands it.

The helper chroots into the shared directory and answers QEMU's T_OPEN with the descriptor itself
(SCM_RIGHTS): every directory the guest opens is a directory descriptor in QEMU. The kernel walks `..`
from a descriptor up to the root of the mount tree it belongs to; the helper's chroot binds only the
helper. Before the fix that tree was a copy of the host's, so from the share's descriptor QEMU's jail
uid reached the host's `/` (world-readable files, /tmp and /dev/shm, unix sockets). Now the helper's
mount namespace is rooted in a read-only tmpfs holding /usr and the share
(pykata.hypervisor.helperroot), so `..` ends there.

The same requests also try what a guest may not do to a host file through the helper (root with
file capabilities): set file capabilities, trusted.* or other security.* xattrs, hard-link a file of
another mount into a volume (all refused; user.* xattrs and links within a volume are the controls).

The takeover is stood in for by speaking the helper's protocol on QEMU's end of its socket, exactly as
QEMU's `-fsdev proxy` does; the walk out is done by a child that is jailed as QEMU is (an empty chroot,
a uid of its own). The same walk from the descriptors a real jailed QEMU holds for a guest's open
directory is in tests/hypervisor/test_jail.py::test_templated_vm_runs_in_every_layer_of_the_jail.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import struct
import subprocess
from pathlib import Path

from pykata.hypervisor.qemu.proxy9p import Proxy9p

T_OPEN, T_LINK, T_LSETXATTR = 2, 7, 19  # QEMU 7.2's hw/9pfs/9p-proxy.h
V9FS_FD_VALID = 0x7FFFFFFF
JAIL_UID = 64999  # a uid no file here belongs to, as a jailed QEMU's


def _open(sock: socket.socket, path: str, flags: int) -> int:
    """T_OPEN as QEMU's proxy backend sends it; returns the descriptor the helper sends back."""
    name = path.encode()
    payload = struct.pack("<H", len(name)) + name + struct.pack("<i", flags)
    sock.sendall(struct.pack("<ii", T_OPEN, len(payload)) + payload)
    msg, ancillary, _, _ = sock.recvmsg(4, socket.CMSG_LEN(4))
    fds = array.array("i")
    for _, _, data in ancillary:
        fds.frombytes(data[:4])
    assert struct.unpack("<i", msg)[0] == V9FS_FD_VALID and len(fds) == 1, (msg, list(fds))
    return fds[0]


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<H", len(data)) + data


def _setxattr(sock: socket.socket, path: str, name: str, value: bytes) -> int:
    """T_LSETXATTR as QEMU sends it; returns the helper's status (0 or -errno)."""
    payload = _string(path) + _string(name) + _string(value) + struct.pack("<ii", len(value), 0)
    sock.sendall(struct.pack("<ii", T_LSETXATTR, len(payload)) + payload)
    _, _, status = struct.unpack("<iii", sock.recv(12, socket.MSG_WAITALL))
    return int(status)


def _link(sock: socket.socket, old: str, new: str) -> int:
    """T_LINK (a hard link, made by the helper as root); returns the helper's status."""
    payload = _string(old) + _string(new)
    sock.sendall(struct.pack("<ii", T_LINK, len(payload)) + payload)
    _, _, status = struct.unpack("<iii", sock.recv(12, socket.MSG_WAITALL))
    return int(status)


def _as_jailed_qemu(dir_fd: int, relative: str, empty: Path) -> str:
    """What a process jailed as QEMU is (root in an empty directory, JAIL_UID) reads at `relative`
    from `dir_fd`, or the error it gets."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only makes syscalls, then _exit
        try:
            os.close(r)
            os.chroot(empty)
            os.chdir("/")
            os.setgroups([])
            os.setgid(JAIL_UID)
            os.setuid(JAIL_UID)
            fd = os.open(relative, os.O_RDONLY, dir_fd=dir_fd)
            os.write(w, b"read:" + os.read(fd, 100))
        except OSError as exc:
            os.write(w, f"error:{exc.strerror}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


def _mount(*args: str | Path) -> None:
    subprocess.run(["mount", *map(str, args)], check=True, capture_output=True)


async def test_no_descriptor_from_the_9p_helper_leads_out_of_the_share(tmp_path: Path) -> None:
    # the host's layout (pykata.resources.mounts): the host mounts under mounts/ (its own peer group),
    # the helper serves shared/, a read-only slave bind of it
    mounts, shared, empty = tmp_path / "mounts", tmp_path / "shared", tmp_path / "empty"
    for d in (mounts, shared, empty):
        d.mkdir()
    (mounts / "inside").write_text("the share")
    (mounts / "later").mkdir()
    (mounts / "vol").mkdir()
    hostpath = tmp_path / "hostpath"  # a read-write volume's host directory
    hostpath.mkdir()
    (hostpath / "data").write_text("volume file")
    (mounts / "vol2").mkdir()
    hostpath2 = tmp_path / "hostpath2"  # a second volume, on the same host file system
    hostpath2.mkdir()
    secret = tmp_path / "host-secret"  # world-readable, beside the share: the jail uid may read it
    secret.write_text("host file")
    os.chmod(tmp_path, 0o755)
    done: list[Path] = []
    try:
        _mount("--bind", mounts, mounts)
        done.append(mounts)
        _mount("--make-shared", mounts)
        _mount("--bind", "-o", "ro", mounts, shared)
        done.append(shared)
        _mount("--make-slave", shared)
        _mount("--bind", hostpath, mounts / "vol")
        done.append(mounts / "vol")
        _mount("--bind", hostpath2, mounts / "vol2")
        done.append(mounts / "vol2")
        proxy = Proxy9p(shared, tmp_path / "proxy.log")
        await proxy.start()
        assert proxy.qemu_fd is not None
        sock = socket.socket(fileno=proxy.qemu_fd)
        proxy.qemu_fd = None
        held: list[int] = []
        try:
            root = _open(sock, "/", os.O_RDONLY | os.O_DIRECTORY)
            held.append(root)
            # control: the descriptor is the share's, and a jailed process reads through it
            assert sorted(os.listdir(root)) == ["inside", "later", "vol", "vol2"]
            assert _as_jailed_qemu(root, "inside", empty) == "read:the share"
            # the attack: `..` from it, as far as it goes
            assert _as_jailed_qemu(root, "../host-secret", empty) == "error:No such file or directory"
            host_root = os.stat("/")
            seen = []
            for depth in range(1, 12):
                up = os.open("/".join([".."] * depth), os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
                held.append(up)
                st = os.fstat(up)
                assert (st.st_dev, st.st_ino) != (host_root.st_dev, host_root.st_ino), f"host / at depth {depth}"
                seen.append(sorted(os.listdir(up)))
            # the top of the helper's tree: the system's programs (read-only) and the way to the share
            assert not set(seen[-1]) - {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "etc",
                                        shared.parts[1]}, seen[-1]
            assert _as_jailed_qemu(root, "../" * 12 + "etc/shadow", empty) == "error:No such file or directory"
            top = os.open("../" * 12, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
            held.append(top)
            assert os.statvfs(top).f_flag & os.ST_RDONLY  # nothing to leave there, even for root
            # xattrs a guest may not set on a host file through the helper (root, but without
            # CAP_SYS_ADMIN and CAP_SETFCAP): file capabilities (a capability-raising binary for host
            # users), trusted.* and other security.* names; user.* is the control
            caps = struct.pack("<IIIII", 0x02000000 | 1, 0xFFFFFFFF, 0, 0xFFFFFFFF, 0)  # VFS_CAP v2, effective
            assert _setxattr(sock, "/vol/data", "user.probe", b"v") == 0
            assert os.getxattr(hostpath / "data", "user.probe") == b"v"
            for name, value in (("security.capability", caps), ("trusted.overlay.opaque", b"y"),
                                ("security.evm", b"x")):
                assert _setxattr(sock, "/vol/data", name, value) == -errno.EPERM, name
                assert name not in os.listxattr(hostpath / "data"), name
            # hard links: within a volume (control), but never of a file from elsewhere into a volume,
            # even another volume of the same host file system (one bind mount each: EXDEV)
            assert _link(sock, "/vol/data", "/vol/data-link") == 0
            assert (hostpath / "data-link").stat().st_ino == (hostpath / "data").stat().st_ino
            assert _link(sock, "/vol/data", "/vol2/stolen") == -errno.EXDEV
            assert _link(sock, "/inside", "/vol/stolen") == -errno.EXDEV
            assert sorted(os.listdir(hostpath2)) == [] and "stolen" not in os.listdir(hostpath)
            # the host's mounts made after the helper started still reach it (a container's root)
            _mount("-t", "tmpfs", "later", mounts / "later")
            done.append(mounts / "later")
            (mounts / "later" / "f").write_text("mounted later")
            later = _open(sock, "/later/f", os.O_RDONLY)
            held.append(later)
            assert os.read(later, 100) == b"mounted later"
        finally:
            for fd in held:
                os.close(fd)
            sock.close()
            await proxy.stop()
        assert proxy.child is not None and not proxy.child.running
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "-l", str(target)], check=False)
        await asyncio.sleep(0)
