"""`-u NAME[:GROUP]` and an image's USER, resolved in the image's own /etc/passwd and /etc/group (as runc and
containerd do), reading an untrusted image's files without following symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata.cli.run import process_args
from pykata.sandbox import SpecError
from pykata.sandbox.imageuser import MAX_FILE, MAX_GROUPS, ExecUser, resolve_user


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1000:1500::/home/app:/bin/sh\n"
                                     "odd:x:nan:1::/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nstaff:x:50:app\napp:x:1500:\nwheel:x:10:root,app\nbad:x:zz:app\n")
    return root


# docker's rules (runc's libcontainer user.GetExecUser, which docker run -u and docker exec -u use):
# a user listed in /etc/passwd (by name or number) takes its uid and primary group from there, and, when
# no group is given, every group of /etc/group that lists its name as a member (in the file's order); a
# number not listed runs as itself with group 0; a group given (name, or number listed or not) replaces
# the primary group, and no supplementary group is added then. Docker (moby's getUser) puts the primary
# group first among the supplementary ones (since CVE-2022-36109).
DOCKER = [
    ("app", ExecUser(1000, 1500, (1500, 50, 10))),
    ("app:staff", ExecUser(1000, 50, (50,))),
    ("app:7", ExecUser(1000, 7, (7,))),
    ("1000", ExecUser(1000, 1500, (1500, 50, 10))),  # a listed number gets its groups too
    ("4242", ExecUser(4242, 0, (0,))),  # not listed: group 0 (pykata gave it 4242)
    ("4242:staff", ExecUser(4242, 50, (50,))),
    ("4242:4343", ExecUser(4242, 4343, (4343,))),
    ("root", ExecUser(0, 0, (0, 10))),
    ("0", ExecUser(0, 0, (0, 10))),
    ("0:0", ExecUser(0, 0, (0,))),
]


@pytest.mark.parametrize("text,want", DOCKER)
def test_names_and_numbers_resolve_in_the_image_as_docker_does(rootfs: Path, text: str, want: ExecUser) -> None:
    assert resolve_user(rootfs, text) == want


def test_without_etc_group_or_an_image(rootfs: Path) -> None:
    """No /etc/group: no supplementary groups, numeric groups only (docker's). No image known (exec into a
    container whose image pykata does not know): numbers only, group 0 unless given."""
    (rootfs / "etc/group").unlink()
    assert resolve_user(rootfs, "app") == ExecUser(1000, 1500, (1500,))
    assert resolve_user(rootfs, "app:7") == ExecUser(1000, 7, (7,))
    with pytest.raises(SpecError, match=r"^--user: the image's /etc/group cannot be read"):
        resolve_user(rootfs, "app:staff")
    assert resolve_user(None, "1000") == ExecUser(1000, 0, (0,))
    assert resolve_user(None, "1000:5") == ExecUser(1000, 5, (5,))
    with pytest.raises(SpecError, match=r"^--user: the image's /etc/passwd is not known"):
        resolve_user(None, "app")


def test_supplementary_groups_are_bounded(rootfs: Path) -> None:
    (rootfs / "etc/group").write_text("".join(f"g{i}:x:{1000 + i}:app\n" for i in range(MAX_GROUPS)))
    with pytest.raises(SpecError, match=f"in {MAX_GROUPS} groups, at most {MAX_GROUPS - 1}"):
        resolve_user(rootfs, "app")


@pytest.mark.parametrize("text,needle", [
    ("nobody", "no user 'nobody' in the image's /etc/passwd"),
    ("app:adm", "no group 'adm' in the image's /etc/group"),
    ("app:bad", "entry of 'bad' has no numeric gid"),
    ("odd", "no numeric uid/gid"),
    (":staff", "is not USER[:GROUP]"),
    ("app:", "is not USER[:GROUP]"),
    ("99999999999", "no user"),  # over 2**32-1: not a number, and no such name
])
def test_what_cannot_be_resolved_is_named(rootfs: Path, text: str, needle: str) -> None:
    with pytest.raises(SpecError, match=r"^--user: ") as err:
        resolve_user(rootfs, text)
    assert needle in str(err.value)


def test_the_images_files_are_read_without_following_symlinks(rootfs: Path, tmp_path: Path) -> None:
    """An image's /etc/passwd that is a symlink (to the host's own, say) is refused, not followed; numbers
    still work without it."""
    (rootfs / "etc/passwd").unlink()
    os.symlink("/etc/passwd", rootfs / "etc/passwd")
    with pytest.raises(SpecError, match=r"cannot be read .*a symlink"):
        resolve_user(rootfs, "root")
    assert resolve_user(rootfs, "4242") == ExecUser(4242, 0, (0,))
    (rootfs / "etc/passwd").unlink()
    (rootfs / "etc/passwd").write_bytes(b"x" * (MAX_FILE + 1))
    with pytest.raises(SpecError, match="at most"):
        resolve_user(rootfs, "app")


def test_entrypoint_and_command_make_the_argv_as_docker_does() -> None:
    assert process_args(("/ep",), ("cmd",), (), None) == ["/ep", "cmd"]
    assert process_args(("/ep",), ("cmd",), ("a",), None) == ["/ep", "a"]
    assert process_args(("/ep",), ("cmd",), (), "id") == ["id"]  # --entrypoint drops the image's CMD
    assert process_args(("/ep",), ("cmd",), ("-u",), "id") == ["id", "-u"]
    assert process_args(("/ep",), ("cmd",), ("sh", "-c", "x"), "") == ["sh", "-c", "x"]  # "": no entrypoint
    with pytest.raises(SpecError, match=r"^--entrypoint: .*nothing to run"):
        process_args(("/ep",), ("cmd",), (), "")


@pytest.mark.parametrize("text", ["4294967295", "4294967295:0", "0:4294967295", "2147483648", "-1", "huge"])
def test_an_id_setresuid_would_ignore_is_refused(rootfs: Path, text: str) -> None:
    """4294967295 is (uid_t)-1: setresuid(-1, -1, -1) changes nothing, so the process would stay root.
    Refused, as everything over runc's 2147483647, naming the field, whether given or from the image."""
    with pytest.raises(SpecError, match=r"^--user: "):
        resolve_user(rootfs, text)
    (rootfs / "etc/passwd").write_text("nobody4:x:4294967295:4294967295::/:/bin/sh\n")
    with pytest.raises(SpecError, match=r"^the image's config.User: 'nobody4' gives uid 4294967295, which is not"):
        resolve_user(rootfs, "nobody4", "the image's config.User")
