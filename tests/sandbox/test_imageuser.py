"""`-u NAME[:GROUP]` and an image's USER, resolved in the image's own /etc/passwd and /etc/group (as runc and
containerd do), reading an untrusted image's files without following symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata.cli.run import process_args
from pykata.sandbox import SpecError
from pykata.sandbox.imageuser import MAX_FILE, resolve_user


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1000:1500::/home/app:/bin/sh\n"
                                     "odd:x:nan:1::/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nstaff:x:50:app\napp:x:1500:\n")
    return root


@pytest.mark.parametrize("text,want", [
    ("app", (1000, 1500)),  # the primary group from /etc/passwd
    ("app:staff", (1000, 50)),
    ("app:7", (1000, 7)),
    ("1000", (1000, 1500)),  # a listed number gets its primary group too
    ("4242", (4242, 4242)),  # one not listed keeps itself as the group, as `-u UID` did
    ("4242:staff", (4242, 50)),
    ("0:0", (0, 0)),
])
def test_names_and_numbers_resolve_in_the_image(rootfs: Path, text: str, want: tuple[int, int]) -> None:
    assert resolve_user(rootfs, text) == want


@pytest.mark.parametrize("text,needle", [
    ("nobody", "no user 'nobody' in the image's /etc/passwd"),
    ("app:wheel", "no group 'wheel' in the image's /etc/group"),
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
    assert resolve_user(rootfs, "4242") == (4242, 4242)
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
