"""`-u NAME[:GROUP]` and an image's USER: user and group names resolved in the image's own /etc/passwd and
/etc/group, as runc and containerd do (libcontainer's user.GetExecUser), before a VM boots.

The image is untrusted: its files are read below its root through descriptors that follow no symlink
(an /etc/passwd that is a symlink, to the host's own or anywhere, is refused rather than resolved),
regular files only, at most MAX_FILE bytes each.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pykata.sandbox.ocispec import SpecError

MAX_FILE = 1 << 20
MAX_ID = 2**32 - 1


def resolve_user(rootfs: Path, text: str, field: str = "--user") -> tuple[int, int]:
    """USER[:GROUP] -> (uid, gid), each a number or a name looked up in the image at `rootfs`. A user
    given alone gets its primary group from /etc/passwd (a number not listed there keeps itself as the
    group, as `-u UID` did before names). Raises SpecError naming `field` and what was not found."""
    user, sep, group = text.partition(":")
    if not user or (sep and not group) or "\0" in text:
        raise SpecError(field, f"{text[:80]!r} is not USER[:GROUP] (names or numbers)")
    uid = _number(user)
    gid: int | None = None
    if uid is None or not sep:
        try:
            passwd = _table(rootfs, "passwd", field)
        except SpecError:
            if uid is None:
                raise
            passwd = []  # a number needs no table: an image without /etc/passwd runs `-u 1000` as before
        row = next((r for r in passwd if len(r) >= 4 and (r[0] == user if uid is None else _number(r[2]) == uid)),
                   None)
        if row is None and uid is None:
            raise SpecError(field, f"no user {user[:80]!r} in the image's /etc/passwd")
        if row is not None:
            uid, primary = _number(row[2]), _number(row[3])
            if uid is None or primary is None:
                raise SpecError(field, f"the image's /etc/passwd entry of {user[:80]!r} has no numeric uid/gid")
            gid = primary
    assert uid is not None
    if sep:
        gid = _number(group)
        if gid is None:
            row = next((r for r in _table(rootfs, "group", field) if len(r) >= 3 and r[0] == group), None)
            if row is None or _number(row[2]) is None:
                raise SpecError(field, f"no group {group[:80]!r} in the image's /etc/group")
            gid = _number(row[2])
    return uid, uid if gid is None else gid


def _number(text: str) -> int | None:
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _table(rootfs: Path, name: str, field: str) -> list[list[str]]:
    """The image's /etc/`name` as rows of fields. Raises SpecError when it is missing, a symlink, not a
    regular file or over MAX_FILE."""
    where = f"the image's /etc/{name}"
    try:
        root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(field, f"cannot open the image's root: {exc.strerror}") from None
    try:
        etc = os.open("etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=etc)
        finally:
            os.close(etc)
    except OSError as exc:
        raise SpecError(field, f"{where} cannot be read ({exc.strerror}: missing, or a symlink) to look "
                               "names up; give numbers") from None
    finally:
        os.close(root)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
            raise SpecError(field, f"{where} is not a regular file of at most {MAX_FILE} bytes")
        data = b""
        while len(data) <= MAX_FILE and (chunk := os.read(fd, MAX_FILE + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise SpecError(field, f"{where} is over {MAX_FILE} bytes")
    return [line.split(":") for line in data.decode(errors="replace").splitlines()
            if line and not line.startswith("#")]
