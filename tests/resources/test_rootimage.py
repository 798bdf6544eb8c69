"""Image disks (pykata.resources.rootimage) and slot bookkeeping (rootslots): built with the real
mke2fs/debugfs, inspected with debugfs (the host never mounts them)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pykata.config.schema import ImageSection, RuntimeConfig
from pykata.resources.mounts import RootfsMount
from pykata.resources.rootimage import RootImageCache, RootImageError, Source, source_for, top_layer
from pykata.resources.rootslots import SlotGrant, SlotTable


def _cache(tmp: Path, *, max_mib: int = 64, cache_mib: int = 1024, **limits: int) -> RootImageCache:
    return RootImageCache(RuntimeConfig(cache_dir=str(tmp / "cache"), rootfs_block_max_mib=max_mib,
                                        rootfs_block_cache_mib=cache_mib), ImageSection(**limits))


def _debugfs(image: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True).stdout


def _tree(tmp: Path) -> Path:
    root = tmp / "tree"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.link(root / "usr/bin/tool", root / "usr/bin/alias")
    (root / "usr/bin/sh").symlink_to("/bin/busybox")
    os.mkfifo(root / "fifo")
    os.chown(root / "usr", 1000, 2000)
    os.utime(root / "usr/bin/tool", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.setxattr(root / "usr/bin/tool", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.chmod(root, 0o750)
    return root


def test_disk_keeps_owners_modes_links_xattrs_and_nanoseconds(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    image = cache.ensure(Source(_tree(tmp_path), None, "tree"))
    assert image.path.stat().st_size == 64 << 20 and image.root_mode == 0o750
    assert image.path.stat().st_blocks * 512 < 8 << 20  # sparse
    assert 0 < image.used_bytes < 8 << 20 and image.prefetch == image.used_bytes
    # ext4's reserved inodes and lost+found, then the tree's few entries (the hard link shares one)
    assert 11 < image.used_inodes < 40
    tool = _debugfs(image.path, "stat /usr/bin/tool")
    assert "Mode:  04755" in tool and "Links: 2" in tool
    # mtime 987654321 ns, atime 123456789 ns: the extra field holds ns << 2
    assert f"mtime: 0x{1_600_000_000:08x}:{987_654_321 << 2:08x}" in tool
    assert f"atime: 0x{1_600_000_000:08x}:{123_456_789 << 2:08x}" in tool
    assert "security.capability" in _debugfs(image.path, "ea_list /usr/bin/tool")
    usr = _debugfs(image.path, "stat /usr")
    assert "User:  1000   Group:  2000" in usr
    assert "Mode:  0750" in _debugfs(image.path, "stat /")
    assert "Type: FIFO" in _debugfs(image.path, "stat /fifo")
    assert "Fast link dest: \"/bin/busybox\"" in _debugfs(image.path, "stat /usr/bin/sh")
    # read-only and unindexed: no journal, and no dir_index (small directories' readdir would hash)
    features = _debugfs(image.path, "features")
    assert "has_journal" not in features and "dir_index" not in features and "extent" in features
    assert not list(cache.dir.glob(".tmp-*"))


def test_tree_key_follows_content_and_store_key_does_not_walk(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    tree = _tree(tmp_path)
    first = cache.ensure(Source(tree, None, "tree"))
    assert cache.ensure(Source(tree, None, "tree")).key == first.key
    (tree / "usr/bin/tool").write_bytes(b"changed")
    second = cache.ensure(Source(tree, None, "tree"))
    assert second.key != first.key and second.path.exists()
    # a store image is named by its digest directory: no walk, one key
    store = tmp_path / "cache/images/oci-sha256-ab/rootfs"
    store.mkdir(parents=True)
    src = source_for(store, tmp_path / "unused", tmp_path / "cache")
    assert src is not None and src.key == "store-oci-sha256-ab" and src.tree == store.resolve()


def test_containerd_snapshots_keyed_by_their_directories(tmp_path: Path) -> None:
    lower1, lower2, upper = tmp_path / "1/fs", tmp_path / "2/fs", tmp_path / "3/fs"
    for d in (lower1, lower2, upper):
        d.mkdir(parents=True)
    mounted = tmp_path / "mounted"
    mounts = [RootfsMount("overlay", "overlay", (f"lowerdir={lower2}:{lower1}", f"upperdir={upper}",
                                                 f"workdir={tmp_path}/w"))]
    src = source_for(mounts, mounted, tmp_path)
    assert src is not None and src.tree == mounted and src.key and src.key.startswith("snap-")
    assert source_for(mounts, mounted, tmp_path) == src
    # a writable snapshot with files of its own can change: no identity, the shared directory is used
    (upper / "f").write_text("x")
    assert source_for(mounts, mounted, tmp_path) is None
    assert source_for([RootfsMount("tmpfs", "none")], mounted, tmp_path) is None


def test_a_built_disk_is_found_without_the_tree_and_the_root_mode_from_the_top_layer(tmp_path: Path) -> None:
    """What lets the host skip mounting a containerd root whose disk is built (sandbox._root_disk,
    cached_only): the cache lookup reads nothing of the tree, and the root's mode comes from the layer
    that gives the read-only root its attributes, as the host's mount (lower_only) would show it."""
    lower1, lower2, upper = tmp_path / "1/fs", tmp_path / "2/fs", tmp_path / "3/fs"
    for d in (lower1, lower2, upper):
        d.mkdir(parents=True)
    os.chmod(lower2, 0o711)
    os.chmod(upper, 0o750)
    (lower1 / "f").write_text("x")
    options = (f"lowerdir={lower2}:{lower1}", f"workdir={tmp_path}/w")
    assert top_layer([RootfsMount("overlay", "overlay", (*options, f"upperdir={upper}"))]) == upper
    assert top_layer([RootfsMount("overlay", "overlay", options)]) == lower2
    assert top_layer([RootfsMount("bind", str(lower1), ("rbind", "ro"))]) == lower1
    assert top_layer(lower1) == lower1
    assert top_layer([RootfsMount("tmpfs", "none")]) is None
    assert top_layer([RootfsMount("bind", str(lower1)), RootfsMount("bind", str(lower2))]) is None

    cache = _cache(tmp_path)
    mounts = [RootfsMount("overlay", "overlay", (*options, f"upperdir={upper}"))]
    src = source_for(mounts, tmp_path / "mounted", tmp_path)
    assert src is not None
    assert cache.cached(src, 0o40750) is None  # not built yet: the host mounts the root to build it
    # built from the merged tree (a copy of it stands in for the host's mount here)
    merged = tmp_path / "mounted"
    merged.mkdir()
    os.chmod(merged, 0o750)
    (merged / "f").write_text("x")
    built = cache.ensure(src)
    found = cache.cached(src, os.stat(upper).st_mode)
    assert found is not None and found.key == built.key and found.path == built.path
    assert found.root_mode == built.root_mode == 0o750 and found.used_bytes == built.used_bytes > 0
    # a tree named by its content is never found without reading it
    assert cache.cached(Source(merged, None, "dir"), 0o755) is None


@pytest.mark.parametrize(("make", "limits", "message"), [
    (lambda r: os.mknod(r / "null", 0o20666, os.makedev(1, 3)), {}, "entry 'null' is a device node"),
    (lambda r: [(r / f"f{i}").touch() for i in range(40)], {"max_entries": 20}, "image.max_entries = 20"),
    (lambda r: (r / ("d" * 200) / ("e" * 200)).mkdir(parents=True), {"max_path_length": 300},
     "image.max_path_length = 300"),
    (lambda r: (r / "big").write_bytes(b"x" * (3 << 20)), {"max_unpacked_mib": 2}, "image.max_unpacked_mib = 2"),
])
def test_hostile_trees_fail_naming_the_image_and_leave_nothing(tmp_path: Path, make: object, limits: dict[str, int],
                                                              message: str) -> None:
    root = tmp_path / "hostile"
    root.mkdir()
    make(root)  # type: ignore[operator]
    cache = _cache(tmp_path, **limits)
    with pytest.raises(RootImageError, match="image hostile-image: .*" + message.replace("(", r"\(")):
        cache.ensure(Source(root, None, "hostile-image"))
    assert not [p for p in cache.dir.iterdir() if not p.name.endswith(".lock")]


def test_image_bigger_than_a_slot_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    with open(root / "blob", "wb") as f:
        f.write(os.urandom(1 << 20) * 20)
    cache = _cache(tmp_path, max_mib=16)
    with pytest.raises(RootImageError, match=r"image big: does not fit a disk of runtime\.rootfs_block_max_mib = 16"):
        cache.ensure(Source(root, None, "big"))
    assert not list(cache.dir.glob("*.ext4")) and not list(cache.dir.glob(".tmp-*"))


def test_eviction_removes_least_recently_used(tmp_path: Path) -> None:
    roomy = _cache(tmp_path)
    images = []
    for i in range(3):
        root = tmp_path / f"t{i}"
        root.mkdir()
        (root / "f").write_bytes(os.urandom(250 << 10))
        images.append(roomy.ensure(Source(root, None, f"t{i}")))
        os.utime(images[-1].path, (1000 + i, 1000 + i))
    # 1 MiB holds two of them: the oldest that is not kept goes
    removed = _cache(tmp_path, cache_mib=1).evict(keep=images[0].path)
    assert removed == [images[1].path.name]
    assert sorted(p.name for p in roomy.dir.glob("*.ext4")) == sorted([images[0].path.name, images[2].path.name])


def test_slot_table_shares_reuses_and_runs_out() -> None:
    t = SlotTable(2)
    assert t.acquire("a", "c1") == SlotGrant(0, fill=True)
    assert t.acquire("a", "c2") == SlotGrant(0, fill=False)
    assert t.acquire("b", "c3") == SlotGrant(1, fill=True)
    assert t.acquire("c", "c4") is None  # both in use
    t.release("c3")
    assert t.acquire("b", "c5") == SlotGrant(1, fill=False)  # still holds b
    t.release("c5")
    assert t.acquire("c", "c6") == SlotGrant(1, fill=True)  # idle b replaced
    t.forget(1)
    assert t.holding()[1] == (None, frozenset())
    assert SlotTable(0).acquire("a", "c1") is None


def test_slot_table_prefill_is_tentative_until_a_container_of_that_image_takes_it() -> None:
    t = SlotTable(3)
    assert t.acquire("warm", "w") == SlotGrant(0, fill=True)
    t.release("w")
    assert t.prefill("warm") is None  # held already
    assert t.prefill("recent") == 1
    assert t.prefill("again") == 2 and t.tentative() == [1, 2]
    t.forget(2)
    assert t.holding()[1] == (None, frozenset())  # a snapshot never records a tentative image
    # another image never takes the tentative slot (a failed fill would leave its image unrecorded)
    assert t.acquire("other", "c1") == SlotGrant(2, fill=True)
    assert t.acquire("other2", "c2") == SlotGrant(0, fill=True)  # the idle warm image replaced
    assert t.acquire("other3", "c3") is None  # not the tentative slot
    assert t.tentative() == [1]
    t.forget(1)  # the caller emptied it
    assert t.tentative() == []
    t2 = SlotTable(2)
    assert t2.prefill("recent") == 0
    assert t2.acquire("recent", "c1") == SlotGrant(0, fill=False)
    assert t2.tentative() == [] and t2.holding()[0] == ("recent", frozenset({"c1"}))
