"""The host side of copied volumes (pykata.resources.watchable): which mounts qualify, and the scan
of a volume's tree, which must never read outside it (symlinks, hard links, special files, mounts)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def test_bind_mounts_of_the_same_file_system_keep_it_on_the_host(tmp_path: Path) -> None:
    """The attack: a host directory, or a host file over a key, bound into the volume from the same
    file system (st_dev is the volume's, the file has one link): the host would copy host files into
    the guest. Every directory and file opened must be on the volume root's own mount."""
    host = tmp_path / "hostdir"
    host.mkdir()
    (host / "secret").write_text("host only\n")
    vol = tmp_path / "cfg"
    write_volume(vol, {"k": b"v"})
    version = os.readlink(vol / "..data")
    cases = [(vol / "m", host, "mkdir"), (vol / version / "k", host / "secret", "file")]
    for target, source, kind in cases:
        if kind == "mkdir":
            target.mkdir()
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        try:
            assert os.stat(target).st_dev == os.stat(vol).st_dev  # what the st_dev check cannot see
            with pytest.raises(watchable.Unsuitable, match=f"{target.name}: a mount inside the volume"):
                watchable.scan(str(vol), 64, 1 << 20)
            with pytest.raises(watchable.Unsuitable, match="a mount inside"):
                watchable.snapshot(_vol(vol))
        finally:
            subprocess.run(["umount", str(target)], check=True)
        if kind == "mkdir":
            target.rmdir()
    assert {e.path for e in watchable.scan(str(vol), 64, 1 << 20)[0]} == {"", "..data", "k", version, f"{version}/k"}


def test_deep_trees_and_long_paths_are_bounded(tmp_path: Path) -> None:
    """A projected volume's item path may be `a/a/a/...` (kubelet allows 4096 bytes): the scan holds a
    descriptor and a stack frame per level, and with a large watchable_max_files the entry bound alone
    let ~2000 levels through (RecursionError in the shim). Deeper than MAX_DEPTH, or a path longer than
    the agent takes, stays shared from the host."""
    deep = tmp_path / "deep"
    write_volume(deep, {"/".join(["a"] * (watchable.MAX_DEPTH - 2)) + "/k": b"v"})
    assert watchable.scan(str(deep), 1024, 1 << 20)  # kubelet's layout at MAX_DEPTH levels: copied
    write_volume(deep, {"/".join(["a"] * watchable.MAX_DEPTH) + "/k": b"v"})
    with pytest.raises(watchable.Unsuitable, match=f"deeper than {watchable.MAX_DEPTH} directories"):
        watchable.scan(str(deep), 1024, 1 << 20)
    long = tmp_path / "long"
    write_volume(long, {"k": b"v"})
    fd = os.open(long, os.O_RDONLY)
    for _ in range(17):  # 17 x 251 bytes: made through descriptors (a path over PATH_MAX)
        os.mkdir("n" * 250, dir_fd=fd)
        fd, old_fd = os.open("n" * 250, os.O_RDONLY, dir_fd=fd), fd
        os.close(old_fd)
    os.close(fd)
    with pytest.raises(watchable.Unsuitable, match=f"longer than {watchable.MAX_PATH} bytes"):
        watchable.scan(str(long), 1024, 1 << 20)


def _swap_after_lstat(monkeypatch: pytest.MonkeyPatch, name: str, swap: Callable[[int], None]) -> list[str]:
    """Run `swap(dir_fd)` right after the scan's lstat of `name`: the window between the lstat and the
    open, where a real race would put it. Returns the names that were swapped (at most one)."""
    real_stat = os.stat
    done: list[str] = []

    def stat_then_swap(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)
        if path == name and not done and kwargs.get("dir_fd") is not None:
            done.append(name)
            swap(kwargs["dir_fd"])
        return st

    monkeypatch.setattr(watchable.os, "stat", stat_then_swap)
    return done


@pytest.mark.parametrize("what", ["dir->symlink", "dir->other dir", "file->symlink", "file->hard link",
                                  "file->fifo", "file grows", "symlink removed", "file removed"])
def test_entries_swapped_between_lstat_and_open_are_a_change_never_a_host_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """TOCTOU: each kind of entry swapped for something that reaches outside the volume (or simply
    changed, as kubelet's own writes do) between the scan's lstat and its open. The scan must raise
    Changing (the next look takes the tree), never read a host file, never raise anything else."""
    host = tmp_path / "hostdir"
    host.mkdir()
    secret = host / "secret"
    secret.write_text("host only\n")
    vol = tmp_path / "cfg"
    write_volume(vol, {"k": b"value", "sub/k2": b"value 2"})
    version = os.readlink(vol / "..data")
    target, swap = {
        "dir->symlink": (version, lambda fd: (os.rename(version, "..old", src_dir_fd=fd, dst_dir_fd=fd),
                                             os.symlink(str(host), version, dir_fd=fd))),
        "dir->other dir": (version, lambda fd: (os.rename(version, "..old", src_dir_fd=fd, dst_dir_fd=fd),
                                               os.rename(host, vol / version))),
        "file->symlink": ("k", lambda fd: (os.unlink("k", dir_fd=fd), os.symlink(str(secret), "k", dir_fd=fd))),
        "file->hard link": ("k", lambda fd: (os.link(secret, vol / version / "k.new"),
                                             os.rename("k.new", "k", src_dir_fd=fd, dst_dir_fd=fd),
                                             os.unlink(secret))),
        "file->fifo": ("k", lambda fd: (os.unlink("k", dir_fd=fd), os.mkfifo("k", dir_fd=fd))),
        "file grows": ("k", lambda fd: (vol / version / "k").write_bytes(b"value and more")),
        "symlink removed": ("..data", lambda fd: os.unlink("..data", dir_fd=fd)),
        "file removed": ("k", lambda fd: os.unlink("k", dir_fd=fd)),
    }[what]
    swapped = _swap_after_lstat(monkeypatch, target, swap)
    with pytest.raises(watchable.Changing, match="while read"):
        watchable.scan(str(vol), 64, 1 << 20)
    assert swapped == [target]
    monkeypatch.undo()
    # the next look sees the tree as it now is; a symlink put in is copied as a symlink, never followed
    if what == "file->fifo":
        with pytest.raises(watchable.Unsuitable, match="special file"):
            watchable.scan(str(vol), 64, 1 << 20)
    else:
        entries, _ = watchable.scan(str(vol), 64, 1 << 20)
        if what.endswith("symlink"):
            assert not any(b"host only" in e.data for e in entries)


def test_a_snapshot_during_kubelets_updates_is_whole_or_none(tmp_path: Path) -> None:
    """kubelet rewriting the volume (new `..<timestamp>`, `..data` swapped, the old one removed) while
    the shim looks: each snapshot is one whole version or None (looked at again), never an error."""
    vol = tmp_path / "cfg"
    write_volume(vol, {"a": b"0", "b": b"0"})
    stop = threading.Event()

    def kubelet() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_volume(vol, {"a": str(i).encode(), "b": str(i).encode()})

    writer = threading.Thread(target=kubelet)
    writer.start()
    whole = none = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            snap = watchable.snapshot(_vol(vol))
            if snap is None:
                none += 1
                continue
            tree = {e.path: e for e in snap[0]}
            data = tree["..data"].data.decode()
            assert tree[f"{data}/a"].data == tree[f"{data}/b"].data
            whole += 1
    finally:
        stop.set()
        writer.join()
    assert whole + none > 10, (whole, none)


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


def test_the_shims_take_only_their_share_of_the_hosts_inotify_instances(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack: nearly every pod has a projected volume (its service account token), and root's
    inotify instances (fs.inotify.max_user_instances, 128 on Debian) are shared with kubelet and
    containerd: one instance per pod's shim would take them all on a busy node. The shims take at most
    1/INOTIFY_SHARE of them (slots held by flock, released with the holder); the others poll."""
    monkeypatch.setattr(watchable, "_max_user_instances", lambda: 2 * watchable.INOTIFY_SHARE)
    slots = tmp_path / "inotify"
    first, second = watchable.RootWatch(slots), watchable.RootWatch(slots)
    try:
        with pytest.raises(OSError, match=r"inotify instances .* are in use"):
            watchable.RootWatch(slots)
        first.close()
        third = watchable.RootWatch(slots)  # a slot freed by its holder is taken again
        third.close()
        # a holder that dies without closing frees its slot too (the kernel drops its flock)
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from pykata.resources import watchable;"
            "watchable._max_user_instances = lambda: 2 * watchable.INOTIFY_SHARE;"
            "w = watchable.RootWatch(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"), str(slots)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            with pytest.raises(OSError, match="in use"):
                watchable.RootWatch(slots)
        finally:
            holder.kill()
            holder.wait()
        watchable.RootWatch(slots).close()
    finally:
        first.close()
        second.close()


def test_a_tree_that_would_not_fit_one_agent_message_stays_shared(tmp_path: Path) -> None:
    """With watchable_max_kib at its 3072 KiB, files within the bound plus long symlink targets (4 KiB
    each, which kubelet's projected items allow) exceed what the agent takes in one SyncVolume (3 MiB
    of contents and targets, 4 MiB frames): the scan says so (the volume stays shared) instead of a
    send that fails the container's creation."""
    vol = tmp_path / "cfg"
    write_volume(vol, {"a": b"x" * ((3 << 20) // 2), "b": b"y" * ((3 << 20) // 2 - 4096)})
    assert watchable.scan(str(vol), 1024, 3 << 20)  # within every bound
    for i in range(64):
        os.symlink("t" * 4000, vol / f"l{i}")
    with pytest.raises(watchable.Unsuitable, match="more than one agent message"):
        watchable.scan(str(vol), 1024, 3 << 20)


def test_pykata_check_says_how_many_inotify_slots_are_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod past pykata's share of inotify instances polls its configmap/secret volumes each second; the
    shim's log said so per volume, and nothing else did. `pykata check` now counts the slots held and
    warns, with the sysctl to raise, once all are."""
    from pykata.cli.check import _inotify
    from pykata.config import load_config

    monkeypatch.setattr(watchable, "_max_user_instances", lambda: 2 * watchable.INOTIFY_SHARE)
    config = load_config()
    monkeypatch.setattr(type(config.runtime), "runtime_path", property(lambda _self: tmp_path))
    slots = tmp_path / "inotify"
    assert watchable.slots_in_use(slots) == (0, 2)
    first = watchable.RootWatch(slots)
    try:
        assert watchable.slots_in_use(slots) == (1, 2)
        result = _inotify(lambda: config)
        assert result.status == "pass" and result.facts == {"in_use": 1, "limit": 2, "slots_dir": str(slots)}
        second = watchable.RootWatch(slots)
        try:
            result = _inotify(lambda: config)
            assert result.status == "warn" and "2 of pykata's 2 inotify instances in use" in result.detail
            assert "polled each second" in result.detail and "max_user_instances" in result.hint
        finally:
            second.close()
    finally:
        first.close()
    assert watchable.slots_in_use(slots) == (0, 2)  # probing took none of them


def test_a_file_whose_last_name_goes_as_it_is_looked_at_is_a_change(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """lstat can see a file with no links while kubelet removes the old `..<timestamp>` directory (its
    name still resolved, its unlink done): a change to look at again, not a volume kept on the host."""
    vol = tmp_path / "cfg"
    write_volume(vol, {"a": b"0"})
    real_stat = os.stat

    def stat_mid_unlink(name: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real_stat(name, *args, **kwargs)
        if name == "a" and stat.S_ISREG(st.st_mode):
            fields = list(st)
            fields[stat.ST_NLINK] = 0
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(watchable.os, "stat", stat_mid_unlink)
    with pytest.raises(watchable.Changing, match="removed while read"):
        watchable.scan(str(vol), 64, 1 << 20)
