"""The host side of copied volumes (pykata.resources.watchable): which mounts qualify, and the scan
of a volume's tree, which must never read outside it (symlinks, hard links, special files, mounts)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from pykata.resources import watchable
from tests.kubeletvolume import write_volume

ROOT = "/var/lib/kubelet"


def _vol(path: Path, max_files: int = 64, max_bytes: int = 1 << 20) -> watchable.WatchedVolume:
    return watchable.WatchedVolume("v", str(path), max_files, max_bytes)


@pytest.mark.parametrize("plugin", watchable.WATCHABLE_PLUGINS)
def test_kubelet_volume_paths_qualify(plugin: str) -> None:
    assert watchable.volume_name(f"{ROOT}/pods/u1/volumes/{plugin}/cfg", ROOT, "u1") == "cfg"


@pytest.mark.parametrize("source", [
    f"{ROOT}/pods/u2/volumes/kubernetes.io~configmap/cfg",        # another pod's
    f"{ROOT}/pods/u1/volumes/kubernetes.io~configmap/cfg/sub",    # deeper
    f"{ROOT}/pods/u1/volumes/kubernetes.io~configmap/../x/cfg",   # crafted
    f"{ROOT}/pods/u1/volumes/kubernetes.io~configmap/Bad_Name",   # not a volume name
    f"{ROOT}/pods/u1/volumes/kubernetes.io~host-path/cfg",        # another plugin
    f"{ROOT}/pods/u1/volume-subpaths/cfg/c0/0",                   # a subPath
    "/elsewhere/pods/u1/volumes/kubernetes.io~configmap/cfg",
])
def test_other_paths_stay_shared(source: str) -> None:
    assert watchable.volume_name(source, ROOT, "u1") is None


def test_scan_copies_kubelets_layout_with_symlinks_as_symlinks(tmp_path: Path) -> None:
    vol = tmp_path / "cfg"
    write_volume(vol, {"a.conf": b"alpha\n", "b.conf": b"beta\n"})
    entries, sig = watchable.scan(str(vol), 64, 1 << 20)
    by_path = {e.path: e for e in entries}
    assert stat.S_ISDIR(by_path[""].mode)
    assert stat.S_ISLNK(by_path["..data"].mode) and by_path["..data"].data.startswith(b"..20")
    assert stat.S_ISLNK(by_path["a.conf"].mode) and by_path["a.conf"].data == b"..data/a.conf"
    ts = by_path["..data"].data.decode()
    assert by_path[f"{ts}/a.conf"].data == b"alpha\n" and stat.S_IMODE(by_path[f"{ts}/a.conf"].mode) == 0o644
    # the signature moves with kubelet's update, and only then
    assert watchable.signature(_vol(vol)) == sig
    write_volume(vol, {"a.conf": b"alpha 2\n"})
    assert watchable.signature(_vol(vol)) != sig


def test_symlinks_out_of_the_volume_are_never_followed(tmp_path: Path) -> None:
    """The attack: entries pointing at host files and directories outside the volume. The host copies
    the links' text, never what they point to."""
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    (tmp_path / "hostdir").mkdir()
    (tmp_path / "hostdir" / "inside").write_text("host only too\n")
    vol = tmp_path / "cfg"
    write_volume(vol, {"ok": b"fine\n"})
    os.symlink(str(secret), vol / "evil")
    os.symlink("../hostdir", vol / "evil-dir")
    os.symlink("/", vol / "root")
    entries, _ = watchable.scan(str(vol), 64, 1 << 20)
    assert not any(b"host only" in e.data for e in entries)
    version = next(e.path for e in entries if e.path.startswith("..20") and "/" not in e.path)
    assert {e.path for e in entries} == {"", "..data", "ok", "evil", "evil-dir", "root", version, f"{version}/ok"}
    assert {e.path: e.data for e in entries}["evil"] == str(secret).encode()
    # the volume's own root as a symlink: not opened
    os.symlink(str(tmp_path / "hostdir"), tmp_path / "linked-root")
    with pytest.raises(watchable.Unsuitable, match="linked-root"):
        watchable.scan(str(tmp_path / "linked-root"), 64, 1 << 20)


def test_special_files_hard_links_and_mounts_keep_it_on_the_host(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("host only\n")
    cases = {}
    fifo = tmp_path / "fifo"
    write_volume(fifo, {"k": b"v"})
    os.mkfifo(fifo / "pipe")  # a read would block the shim: never opened
    cases["fifo"] = (fifo, "special file")
    sock = tmp_path / "sock"
    write_volume(sock, {"k": b"v"})
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock / "s"))
    cases["socket"] = (sock, "special file")
    dev = tmp_path / "dev"
    write_volume(dev, {"k": b"v"})
    os.mknod(dev / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    cases["device"] = (dev, "special file")
    hard = tmp_path / "hard"
    write_volume(hard, {"k": b"v"})
    os.link(outside, hard / "hl")
    cases["hard link"] = (hard, "2 links")
    try:
        for path, message in cases.values():
            with pytest.raises(watchable.Unsuitable, match=message):
                watchable.scan(str(path), 64, 1 << 20)
    finally:
        s.close()
    mounted = tmp_path / "mounted"
    write_volume(mounted, {"k": b"v"})
    (mounted / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mounted / "m")], check=True)
    try:
        with pytest.raises(watchable.Unsuitable, match="another file system"):
            watchable.scan(str(mounted), 64, 1 << 20)
    finally:
        subprocess.run(["umount", str(mounted / "m")], check=True)


def test_bounds(tmp_path: Path) -> None:
    vol = tmp_path / "cfg"
    write_volume(vol, {f"k{i}": b"x" * 100 for i in range(5)})
    assert len(watchable.scan(str(vol), 5, 500)[0]) == 1 + 1 + 5 + 1 + 5
    with pytest.raises(watchable.Unsuitable, match="more than 4 files"):
        watchable.scan(str(vol), 4, 1 << 20)
    with pytest.raises(watchable.Unsuitable, match="more than 499 bytes"):
        watchable.scan(str(vol), 64, 499)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):
        os.symlink("x", many / f"l{i}")
    with pytest.raises(watchable.Unsuitable, match="entries"):
        watchable.scan(str(many), 2, 1 << 20)


def test_root_watch_wakes_on_kubelets_update_and_drains(tmp_path: Path) -> None:
    import select

    vol = tmp_path / "cfg"
    write_volume(vol, {"a": b"1"})
    watch = watchable.RootWatch()
    try:
        watch.add(str(vol))
        assert select.select([watch.fd], [], [], 0)[0] == []
        write_volume(vol, {"a": b"2"})
        assert select.select([watch.fd], [], [], 1)[0] == [watch.fd]
        watch.drain()
        assert select.select([watch.fd], [], [], 0)[0] == []
        os.symlink("/", tmp_path / "link")
        with pytest.raises(OSError, match="inotify_add_watch"):
            watch.add(str(tmp_path / "link"))  # a symlink is not followed
    finally:
        watch.close()
