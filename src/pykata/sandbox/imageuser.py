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
from typing import NamedTuple

from pykata.ids import USER_ID_RULE, is_user_id
from pykata.sandbox.ocispec import SpecError

MAX_FILE = 1 << 20
MAX_ID = 2**32 - 1
MAX_GROUPS = 256  # supplementary groups of one user (what the agent takes in additionalGids)


class ExecUser(NamedTuple):
    """Who a process runs as: `uid`, `gid` and the supplementary `groups` (OCI additionalGids; docker puts
    the primary group first, see resolve_user)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def to_list(self) -> list[int]:
        """[uid, gid, groups...], as a record keeps it (ContainerRecord.user, the SDK's saved state)."""
        return [self.uid, self.gid, *self.groups]

    @classmethod
    def from_list(cls, value: object) -> ExecUser | None:
        """The user of a to_list() read back (a file: untrusted in shape); None when it is not one."""
        if not (isinstance(value, (list, tuple)) and 2 <= len(value) <= 2 + MAX_GROUPS
                and all(is_user_id(v) for v in value)):
            return None
        return cls(value[0], value[1], tuple(value[2:]))


def container_user(rootfs: Path | None, given: str | None, image_user: str, field: str = "--user") -> ExecUser:
    """Who a container's process runs as, in docker's order (moby's getUser): the user `given` (-u, the
    SDK's user), else the image's USER, else root with the groups the image's /etc/group gives root;
    names looked up in the image at `rootfs` (resolve_user). `pykata run` and the SDK both decide it
    here. Raises SpecError naming `field` (for `given`) or the image's config.User."""
    if given:
        return resolve_user(rootfs, given, field)
    if image_user:
        return resolve_user(rootfs, image_user, "the image's config.User")
    try:
        return resolve_user(rootfs, "0")
    except SpecError:  # an /etc/passwd or /etc/group docker would read as empty
        return ExecUser(0, 0, (0,))


def check_user_text(text: str, field: str = "--user") -> str:
    """`text` when it can be a USER[:GROUP] (names, or numbers in ids.USER_ID_RULE's range), checked
    before any image is known. Raises SpecError naming `field`."""
    user, sep, group = text.partition(":")
    if not user or (sep and not group) or "\0" in text:
        raise SpecError(field, f"{text[:80]!r} is not USER[:GROUP] (names or numbers)")
    for part in (user, group):
        if part.isascii() and part.isdigit() and not is_user_id(int(part)):
            raise SpecError(field, f"{text[:80]!r}: {part[:20]} is not {USER_ID_RULE}")
    return text


def resolve_user(rootfs: Path | None, text: str, field: str = "--user") -> ExecUser:
    """resolve_user_ids, each id then checked (ids.USER_ID_RULE: 4294967295 is (uid_t)-1, a no-op for
    setresuid, so the process would stay root). Raises SpecError naming `field`."""
    who = resolve_user_ids(rootfs, text, field)
    for kind, value in (("uid", who.uid), ("gid", who.gid), *(("supplementary group", g) for g in who.groups)):
        if not is_user_id(value):
            raise SpecError(field, f"{text[:80]!r} gives {kind} {value}, which is not {USER_ID_RULE}")
    return who


def resolve_user_ids(rootfs: Path | None, text: str, field: str = "--user") -> ExecUser:
    """USER[:GROUP] -> ExecUser, each a number or a name looked up in the image at `rootfs` (None: an image
    pykata does not know, so numbers only), with docker's rules (runc's libcontainer user.GetExecUser,
    which `docker run -u` and `docker exec -u` use):
      - a user found in /etc/passwd (by name, or by number) gets its uid and primary group from there;
        a number not listed there runs as itself with group 0;
      - GROUP (a name from /etc/group, or a number, listed or not) replaces the primary group, and then
        no supplementary group is added;
      - without GROUP, a user found in /etc/passwd gets as supplementary groups every group of
        /etc/group that lists its name among its members (in the file's order);
      - the supplementary groups start with the primary group (docker since CVE-2022-36109, so that a
        file's group permissions cannot be bypassed by dropping a group).
    Raises SpecError naming `field` and what was not found."""
    user, sep, group = text.partition(":")
    if not user or (sep and not group) or "\0" in text:
        raise SpecError(field, f"{text[:80]!r} is not USER[:GROUP] (names or numbers)")
    uid = _number(user)
    gid = 0
    try:
        passwd = _table(rootfs, "passwd", field)
    except SpecError:
        if uid is None:
            raise
        passwd = []  # a number needs no table: an image without /etc/passwd runs `-u 1000` as docker does
    row = next((r for r in passwd if len(r) >= 4 and (r[0] == user if uid is None else _number(r[2]) == uid)), None)
    if row is None and uid is None:
        raise SpecError(field, f"no user {user[:80]!r} in the image's /etc/passwd")
    matched = ""
    if row is not None:
        uid, primary = _number(row[2]), _number(row[3])
        if uid is None or primary is None:
            raise SpecError(field, f"the image's /etc/passwd entry of {user[:80]!r} has no numeric uid/gid")
        gid, matched = primary, row[0]
    assert uid is not None
    if sep:
        number = _number(group)
        try:
            groups = _table(rootfs, "group", field)
        except SpecError:
            if number is None:
                raise
            groups = []
        found = next((r for r in groups if len(r) >= 3 and (r[0] == group if number is None
                                                             else _number(r[2]) == number)), None)
        if found is None and number is None:
            raise SpecError(field, f"no group {group[:80]!r} in the image's /etc/group")
        listed = number if found is None else _number(found[2])
        if listed is None:
            raise SpecError(field, f"the image's /etc/group entry of {group[:80]!r} has no numeric gid")
        return ExecUser(uid, listed, (listed,))
    if not matched:
        return ExecUser(uid, gid, (gid,))
    try:
        groups = _table(rootfs, "group", field)
    except SpecError:
        groups = []  # docker: no /etc/group, no supplementary groups
    extra = tuple(n for r in groups if len(r) >= 4 and matched in r[3].split(",")
                  and (n := _number(r[2])) is not None)
    if len(extra) >= MAX_GROUPS:
        raise SpecError(field, f"the image's /etc/group lists {matched[:80]!r} in {len(extra)} groups, "
                               f"at most {MAX_GROUPS - 1}")
    return ExecUser(uid, gid, (gid, *extra))


def _number(text: str) -> int | None:
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _table(rootfs: Path | None, name: str, field: str) -> list[list[str]]:
    """The image's /etc/`name` as rows of fields. Raises SpecError when it is missing (or the image is
    not known: `rootfs` None), a symlink, not a regular file or over MAX_FILE."""
    where = f"the image's /etc/{name}"
    if rootfs is None:
        raise SpecError(field, f"{where} is not known to pykata (the container has no image it knows) to "
                               "look names up; give numbers")
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
