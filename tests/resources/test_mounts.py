"""Host mounts of the sandbox layer (real mount(2), in a temp dir). The attacks on them are in
tests/security/test_host_mounts.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.resources import mounts
from pykata.resources.mounts import MountError, RootfsMount


def test_containerd_style_overlay_and_records(tmp_path: Path) -> None:
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_text("from lower")
    recs = mounts.mount_all([RootfsMount("overlay", "overlay", (f"workdir={work}", f"upperdir={upper}",
                                                                f"lowerdir={lower}"))], tmp_path, "target")
    target = tmp_path / "target"
    try:
        assert (target / "f").read_text() == "from lower"
        (target / "g").write_text("new")
        assert (upper / "g").read_text() == "new"
        recs.append(mounts.bind(lower, tmp_path, "target/sub", readonly=True))
        with pytest.raises(OSError):
            (target / "sub" / "x").write_text("no")
        assert [r.path for r in recs] == [target, target / "sub"]
    finally:
        for rec in reversed(recs):
            rec.unmount()
            rec.unmount()  # idempotent
    assert mounts.mounts_under(target) == []


def test_bad_root_mounts_are_named_and_undone(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="unsupported root mount type"):
        mounts.mount_all([RootfsMount("nfs", "host:/x")], tmp_path, "t")
    with pytest.raises(MountError, match="No such file"):
        mounts.mount_all([RootfsMount("bind", str(tmp_path / "missing"), ("rbind",))], tmp_path, "t")
    with pytest.raises(MountError, match="not allowed"):
        mounts.bind(tmp_path, tmp_path, "t/../x")
    assert mounts.mounts_under(tmp_path) == []


def test_unmount_all_cleans_up_what_a_dead_owner_left(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    rec = mounts.bind(tmp_path / "src", tmp_path, "a/b")
    mounts.bind(tmp_path / "src", tmp_path, "a/b/c")
    assert mounts.unmount_all(tmp_path / "a") == 2
    assert mounts.mounts_under(tmp_path) == []
    rec.unmount()  # already gone: fine


def test_lower_layers_only_are_read_only(tmp_path: Path) -> None:
    # runtime.rootfs_upper = "guest": the host mounts only the read-only layers, the snapshot's
    # upper directory on top of its lowers, and the guest adds the writable layer itself
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_text("from lower")
    (upper / "f").write_text("from upper")
    (lower / "g").write_text("only lower")
    cases = {
        "overlay": [RootfsMount("overlay", "overlay", (f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower}",
                                                       "index=off"))],
        "bind": [RootfsMount("bind", str(upper), ("rbind", "rw"))],
        "single-layer": [RootfsMount("overlay", "overlay", (f"lowerdir={lower}",))],
    }
    for name, root in cases.items():
        recs = mounts.lower_all(root, tmp_path, name)
        target = tmp_path / name
        try:
            assert (target / "f").read_text() == ("from lower" if name == "single-layer" else "from upper")
            if name == "overlay":
                assert (target / "g").read_text() == "only lower"
            with pytest.raises(OSError, match="Read-only"):
                (target / "new").write_text("no")
        finally:
            for rec in reversed(recs):
                rec.unmount()
        assert mounts.mounts_under(target) == []
    assert sorted(p.name for p in upper.iterdir()) == ["f"] and not list(work.iterdir())
