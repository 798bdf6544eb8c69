"""WriteFileFromDisk / ReadFileToDisk: a container's file to or from the data disk.

The host puts a file of its own behind the data disk (a writable virtio-blk device,
pykata.hypervisor.qemu.datadisk) and asks the agent to copy between the disk's first bytes and a
file of a container. The copy runs in a child that is the container's process (nsexec.act: its
namespaces, cgroup, user, capabilities and seccomp), so the path is resolved as `cat > path` in the
container would resolve it, with that process's permissions.

Under TCG every byte the guest's CPU copies costs the host ~10 ns, so the disk is read and written
with O_DIRECT (QEMU moves the bytes between guest memory and its file): a download goes from the
file's mapped pages to the disk with no guest copy at all (~4 ms of QEMU CPU per MiB, against ~17
through the page cache), an upload is read into one buffer and written to the file, one copy (~11
ms/MiB; reading into the file's mapped pages costs more, as each new page is zeroed first). Where
O_DIRECT or mmap is refused the copy falls back to sendfile.

The disk's cached blocks are dropped before each copy (the host gave it new content) and after it
(written back first: the host reads the file once the call answers; and the guest's memory should
not keep a copy of the transfer).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import struct
import time
from pathlib import Path

from pykata.agent import nsexec
from pykata.agent.reaper import Reaper
from pykata.errors import FailedPrecondition, InvalidArgument

BLKFLSBUF = 0x1261
BLKGETSIZE64 = 0x80081272
SYS_BLOCK = Path("/sys/block")
DEVICE_WAIT = 2.0
COPY_TIMEOUT_PER_MIB = 2.0  # seconds: a loaded TCG guest copies tens of MiB per second
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23  # Linux 5.14; Python 3.11 lacks the names
SECTOR = 512  # O_DIRECT's unit on a virtio disk (QEMU's default logical block size)
DIRECT_CHUNK = 8 << 20  # one O_DIRECT call (the kernel splits it into the disk's largest requests)
SERIAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_ANSWER = struct.Struct("<QQIII")  # bytes copied, file size, mode, uid, gid


def find_disk(serial: str, sys_block: Path = SYS_BLOCK) -> str:
    """/dev/vdX of the virtio disk with serial `serial`. Raises InvalidArgument."""
    if not serial or len(serial) > 20 or not set(serial) <= SERIAL_CHARS:
        raise InvalidArgument("disk", f"{serial[:40]!r} is not a disk serial")
    deadline = time.monotonic() + DEVICE_WAIT
    while True:
        for entry in sorted(sys_block.glob("vd*/serial")):
            with contextlib.suppress(OSError):
                if entry.read_text().strip() == serial:
                    return f"/dev/{entry.parent.name}"
        if time.monotonic() > deadline:
            raise InvalidArgument("disk", f"no virtio disk with serial {serial!r}")
        time.sleep(0.05)


def open_disk(device: str, *, write: bool, length: int) -> int:
    """The disk opened for a copy of `length` bytes, its cache dropped. Raises InvalidArgument (longer
    than the disk), OSError."""
    fd = os.open(device, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        if length > size:
            raise InvalidArgument("length", f"{length} bytes do not fit the data disk ({size} bytes)")
        fcntl.ioctl(fd, BLKFLSBUF)
    except BaseException:
        os.close(fd)
        raise
    return fd


def close_disk(fd: int) -> None:
    """Write back and drop the disk's cached blocks, then close it."""
    try:
        fcntl.ioctl(fd, BLKFLSBUF)  # syncs the device first
    finally:
        os.close(fd)


def copy_timeout(length: int) -> float:
    return 30.0 + COPY_TIMEOUT_PER_MIB * (length >> 20)


def _answer(copied: int, st: os.stat_result) -> bytes:
    return _ANSWER.pack(copied, st.st_size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def parse_answer(data: bytes) -> tuple[int, int, int, int, int]:
    """(copied, file size, mode, uid, gid) from a child's answer. Raises FailedPrecondition."""
    if len(data) != _ANSWER.size:
        raise FailedPrecondition(f"the copy answered {len(data)} bytes, not {_ANSWER.size}")
    copied, size, mode, uid, gid = _ANSWER.unpack(data)
    return copied, size, mode, uid, gid


def _direct_in(direct: int, fd: int, offset: int, length: int) -> bool:
    """The disk's first `length` bytes into the file at `offset`: read by DMA (O_DIRECT) into one
    reused buffer, then written, so the guest copies each byte once (under TCG every byte a guest copies
    costs ~10 ns of the host's CPU) and its page cache holds nothing of the disk. (Reading straight
    into the file's mapped pages costs more: each new page is zeroed first.)"""
    with mmap.mmap(-1, DIRECT_CHUNK) as buf, memoryview(buf) as view:
        pos = 0
        while pos < length:
            want = min(DIRECT_CHUNK, length - pos)
            n = os.preadv(direct, [view[:want + -want % SECTOR]], pos)
            if n < want:
                raise OSError(0, f"the data disk ended after {pos + max(n, 0)} bytes")
            done = 0
            while done < want:
                done += os.pwrite(fd, view[done:want], offset + pos + done)
            pos += want
    return True


def _direct_out(direct: int, fd: int, offset: int, length: int) -> bool:
    """`length` bytes of the file from `offset` onto the disk's start by DMA from the file's mapped
    pages (O_DIRECT); False when the file cannot be mapped (the caller copies)."""
    if offset % PAGE or not length:
        return False
    try:
        mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
    except (OSError, ValueError):
        return False
    with mm, memoryview(mm) as view:
        with contextlib.suppress(OSError):
            mm.madvise(MADV_POPULATE_READ)
        aligned = length - length % SECTOR
        pos = 0
        while pos < aligned:
            pos += os.pwritev(direct, [view[pos:min(aligned, pos + DIRECT_CHUNK)]], pos)
        if aligned < length:
            with mmap.mmap(-1, PAGE) as bounce, memoryview(bounce) as b:
                b[:length - aligned] = view[aligned:length]
                os.pwritev(direct, [b[:SECTOR]], aligned)
    return True


def write_from_disk(disk: int, path: str, offset: int, length: int, *, create: bool, mode: int | None,
                    uid: int | None, gid: int | None, direct: int = -1) -> bytes:
    """In the container's process: the disk's first `length` bytes into `path` at `offset` (with
    `create`: parents made, the file created or truncated first), then chmod/chown as asked."""
    if create:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | (os.O_CREAT | os.O_TRUNC if create else 0)
    fd = os.open(path, flags, 0o666)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, f"{path}: not a regular file")
        os.set_blocking(fd, True)
        os.lseek(fd, offset, os.SEEK_SET)
        copied = length if direct >= 0 and length and _direct_in(direct, fd, offset, length) else 0
        while copied < length:
            n = os.sendfile(fd, disk, copied, length - copied)
            if n == 0:
                raise OSError(0, f"{path}: the data disk ended after {copied} bytes")
            copied += n
        if mode is not None:
            os.fchmod(fd, mode)
        if uid is not None and gid is not None:
            os.fchown(fd, uid, gid)
        return _answer(copied, os.fstat(fd))
    finally:
        os.close(fd)


def read_to_disk(disk: int, path: str, offset: int, length: int, direct: int = -1) -> bytes:
    """In the container's process: at most `length` bytes of `path` from `offset` onto the disk's start
    (fewer at the end of the file), written back to the disk before answering."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, f"{path}: not a regular file")
        want = min(length, max(0, st.st_size - offset))
        copied = want if direct >= 0 and _direct_out(direct, fd, offset, want) else 0
        while copied < want:
            n = os.sendfile(disk, fd, offset + copied, want - copied)
            if n == 0:
                break  # the file shrank meanwhile: the host sees fewer bytes than the size it was told
            copied += n
        os.fdatasync(disk)
        return _answer(copied, st)
    finally:
        os.close(fd)


async def run(plan: nsexec.ExecPlan, reaper: Reaper, device: str, *, write: bool, path: str, offset: int,
              length: int, create: bool = False, mode: int | None = None, uid: int | None = None,
              gid: int | None = None) -> tuple[int, int, int, int, int]:
    """One copy as the container's process of `plan`; (copied, file size, mode, uid, gid).
    Raises InvalidArgument, nsexec.ActionFailed, ProcessLookupError, OSError, TimeoutError."""
    disk = open_disk(device, write=not write, length=length)
    try:
        direct = os.open(device, (os.O_RDONLY if write else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        direct = -1
    try:
        if write:
            def action() -> bytes:
                return write_from_disk(disk, path, offset, length, create=create, mode=mode, uid=uid, gid=gid,
                                       direct=direct)
        else:
            def action() -> bytes:
                return read_to_disk(disk, path, offset, length, direct=direct)
        answer = await nsexec.act(plan, reaper, action, keep=[fd for fd in (disk, direct) if fd >= 0],
                                  timeout=copy_timeout(length))
    finally:
        if direct >= 0:
            os.close(direct)
        close_disk(disk)
    return parse_answer(answer)
