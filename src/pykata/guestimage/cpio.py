"""A reproducible newc ("070701") cpio writer for the guest initrd.

Entries are written sorted by path, owned by root, with one fixed mtime and inode numbers assigned
in order, so the same tree always gives the same bytes whatever the host's file metadata says.
Hard links are stored as separate files (the kernel's initramfs unpacker does not need them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pykata.errors import PykataError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class CpioError(PykataError):
    """A tree cannot be archived (an unsupported file type or a bad path)."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: `path` is relative to the archive root, without a leading slash."""

    path: str
    mode: int  # full st_mode: file type bits and permissions
    data: bytes = b""  # file content or symlink target
    rdev: int = 0  # device number of a character/block device node


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def encode_entry(entry: CpioEntry, ino: int, mtime: int) -> bytes:
    """Return the header, name and data of one newc entry (uid/gid 0, nlink from its type)."""
    name = entry.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, 0, 0, nlink, mtime, len(entry.data),
        0, 0, os.major(entry.rdev), os.minor(entry.rdev), len(name), 0,
    )
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def trailer() -> bytes:
    """The end-of-archive entry."""
    return encode_entry(CpioEntry(TRAILER, 0), 0, 0)


def tree_entries(root: Path) -> Iterator[CpioEntry]:
    """Yield the entries of the tree under `root`, sorted by path, parents before children.

    Raises CpioError for a socket or FIFO (nothing a root filesystem image should carry).
    """
    stack = [""]
    # A sorted walk: each directory's children sorted by name, depth first, so "a/b" comes before
    # "a.b" exactly as a sorted list of paths would have it only within one directory; what matters
    # is that the order is a pure function of the tree.
    while stack:
        rel = stack.pop()
        if rel:
            full = root / rel
            st = full.lstat()
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                yield CpioEntry(rel, mode)
            elif stat.S_ISREG(mode):
                yield CpioEntry(rel, mode, full.read_bytes())
            elif stat.S_ISLNK(mode):
                yield CpioEntry(rel, mode, os.readlink(full).encode())
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                yield CpioEntry(rel, mode, rdev=st.st_rdev)
            else:
                raise CpioError(f"{rel}: unsupported file type {stat.filemode(mode)}")
            if not stat.S_ISDIR(mode):
                continue
        directory = root / rel if rel else root
        children = sorted(os.listdir(directory), reverse=True)
        stack.extend(f"{rel}/{c}" if rel else c for c in children)


def write_archive(entries: Iterator[CpioEntry] | list[CpioEntry], out: BinaryIO, mtime: int) -> int:
    """Write `entries` and a trailer to `out`; return the number of bytes written."""
    written = 0
    for ino, entry in enumerate(entries, start=1):
        if entry.path.startswith("/") or not entry.path:
            raise CpioError(f"bad archive path {entry.path!r}: must be relative and non-empty")
        chunk = encode_entry(entry, ino, mtime)
        out.write(chunk)
        written += len(chunk)
    end = trailer()
    out.write(end)
    return written + len(end)
