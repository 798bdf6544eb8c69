"""Host mounts of the sandbox layer (real mount(2), in a temp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.sandbox import mounts
from pykata.sandbox.mounts import MountError, RootfsMount


def test_containerd_style_overlay_and_unmount_all(tmp_path: Path) -> None:
    lower, upper, work, target = (tmp_path / n for n in ("lower", "upper", "work", "target"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_text("from lower")
    mounts.mount_all([RootfsMount("overlay", "overlay", (f"workdir={work}", f"upperdir={upper}",
                                                          f"lowerdir={lower}"))], target)
    try:
        assert (target / "f").read_text() == "from lower"
        (target / "g").write_text("new")
        assert (upper / "g").read_text() == "new"
        ro = tmp_path / "ro"
        mounts.bind(lower, target / "sub", readonly=True)
        with pytest.raises(OSError):
            (target / "sub" / "x").write_text("no")
        _ = ro
    finally:
        assert mounts.unmount_all(target) == 2
    assert mounts.mounts_under(target) == []


def test_bad_root_mounts_are_named_and_undone(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="unsupported root mount type"):
        mounts.mount_all([RootfsMount("nfs", "host:/x")], tmp_path / "t")
    with pytest.raises(MountError, match="does not exist"):
        mounts.mount_all([RootfsMount("bind", str(tmp_path / "missing"), ("rbind",))], tmp_path / "t")
    assert mounts.mounts_under(tmp_path) == []
