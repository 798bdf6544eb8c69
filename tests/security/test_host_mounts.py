"""Attacks on the host mounts pykata makes for a pod, each performed for real (mount(2), a host user
via setpriv) in a private mount namespace, each asserting the refusal and that nothing is left.

The guest cannot write the directories the host mounts on (that is what the read-only shared view
is for: the first test shows it), so the tests that plant symlinks write them where only a
compromised host-side step could, to show the second wall (O_NOFOLLOW fds) holds on its own.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from pykata.resources import mountapi, mounts
from pykata.resources.mounts import MountError, RootfsMount, SandboxMounts
from pykata.sandbox import state
from pykata.sandbox.sandbox import make_sandbox_dir
from tests.security.mountns import in_private_mount_ns, is_mount_point, make_shared_host_root, mount

NOBODY = 65534


def _sandbox(host: Path) -> SandboxMounts:
    """A sandbox directory laid out as Sandbox does, under `host`/run/pykata/sandboxes/sb1."""
    d = host / "run" / "pykata" / "sandboxes" / "sb1"
    make_sandbox_dir(d)
    sm = SandboxMounts(d)
    sm.setup()
    return sm


def _image(host: Path) -> Path:
    img = host / "image"
    img.mkdir(mode=0o755)
    os.chmod(img, 0o755)
    (img / "bin").mkdir()
    (img / "etc").mkdir()
    return img


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
                          capture_output=True, text=True, check=False)


def _assert_nothing_left(host: Path, *own: Path) -> None:
    """Nothing mounted below `host` but the test's own mounts `own`."""
    left = {p for p in mounts.mounts_under(host) if p != host} - set(own)
    assert left == set(), f"mounts left behind: {left}"


def test_runtime_dirs_are_not_world_readable(tmp_path: Path) -> None:
    def body() -> None:
        host = tmp_path / "host"
        host.mkdir()
        make_shared_host_root(str(host))
        sm = _sandbox(host)
        state.save(sm.dir, state.SandboxRecord(id="sb1", owner_pid=os.getpid(), created_at=0.0))
        try:
            modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (sm.dir.parent.parent, sm.dir.parent, sm.dir)}
            assert modes == {sm.dir.parent.parent: 0o711, sm.dir.parent: 0o711, sm.dir: 0o700}
            assert stat.S_IMODE((sm.dir / state.STATE_FILE).stat().st_mode) == 0o600
            os.mkdir(sm.mounts_dir / "c1")
            sm.add_rootfs("c1", _image(host), sm.dir / "overlay" / "c1")
            # the container's own root keeps the image root's mode: its non-root users can use it
            assert stat.S_IMODE((sm.shared_dir / "c1" / "rootfs").stat().st_mode) == 0o755
            (sm.shared_dir / "c1" / "rootfs" / "etc" / "secret").write_text("a Secret volume's content")
            for path in (sm.dir, sm.dir.parent, sm.shared_dir / "c1" / "rootfs" / "etc" / "secret",
                         sm.dir / "overlay" / "c1" / "upper" / "etc" / "secret"):
                res = _as_nobody("cat" if path.name == "secret" else "ls", str(path))
                assert res.returncode != 0 and "Permission denied" in res.stderr, (path, res)
        finally:
            sm.teardown()
        _assert_nothing_left(host)

    in_private_mount_ns(body)


def test_the_guest_cannot_write_where_the_host_mounts(tmp_path: Path) -> None:
    """shared/ (what the guest sees) is read-only except inside a container's root and rw volumes:
    even root on the host gets EROFS planting `volumes/0 -> /etc/cron.d` there."""
    def body() -> None:
        host = tmp_path / "host"
        host.mkdir()
        make_shared_host_root(str(host))
        sm = _sandbox(host)
        try:
            os.mkdir(sm.mounts_dir / "c1")
            sm.add_rootfs("c1", _image(host), sm.dir / "overlay" / "c1")
            (host / "data").mkdir()
            sm.add_volume("c1", 0, host / "data", readonly=False)
            for attempt in (lambda: os.symlink("/etc/cron.d", sm.shared_dir / "c1" / "volumes" / "1"),
                            lambda: os.mkdir(sm.shared_dir / "c2"),
                            lambda: os.rename(sm.shared_dir / "c1" / "volumes", sm.shared_dir / "c1" / "v"),
                            lambda: os.symlink("/usr/local/bin", sm.shared_dir / "c3")):
                with pytest.raises(OSError) as exc:
                    attempt()
                assert exc.value.errno == errno.EROFS
            # inside the container's root and its rw volume the guest writes as before
            (sm.shared_dir / "c1" / "rootfs" / "new").write_text("x")
            (sm.shared_dir / "c1" / "volumes" / "0" / "new").write_text("y")
            assert (host / "data" / "new").read_text() == "y"
            flags = os.statvfs(sm.shared_dir).f_flag
            assert flags & os.ST_RDONLY and flags & os.ST_NOSUID and flags & os.ST_NODEV
        finally:
            sm.teardown()
        _assert_nothing_left(host)

    in_private_mount_ns(body)


def test_symlink_planted_mount_targets_are_refused(tmp_path: Path) -> None:
    def body() -> None:
        host = tmp_path / "host"
        host.mkdir()
        make_shared_host_root(str(host))
        cron, bindir, etc = host / "etc" / "cron.d", host / "usr" / "local" / "bin", host / "etc"
        cron.mkdir(parents=True)
        bindir.mkdir(parents=True)
        (host / "hosts").write_text("127.0.0.1 localhost\n")
        (host / "data").mkdir()
        sm = _sandbox(host)
        try:
            m = sm.mounts_dir
            (m / "c1" / "volumes").mkdir(parents=True)
            os.symlink(cron, m / "c1" / "volumes" / "0")
            os.symlink(bindir, m / "c1" / "rootfs")
            (m / "c2").mkdir()
            os.symlink(etc, m / "c2" / "volumes")                 # an intermediate component
            (m / "c3" / "volumes").mkdir(parents=True)
            os.symlink(etc / "passwd", m / "c3" / "volumes" / "0")  # a file target
            cases = [
                ("c1/volumes/0", lambda: sm.add_volume("c1", 0, host / "data", readonly=False)),
                ("c1/rootfs", lambda: sm.add_rootfs("c1", _image(host), sm.dir / "overlay" / "c1")),
                ("c1/rootfs", lambda: sm.add_rootfs("c1", [RootfsMount("bind", str(host / "data"), ("rbind",))],
                                                    sm.dir / "overlay" / "c1")),
                ("c2/volumes", lambda: sm.add_volume("c2", 0, host / "data", readonly=True)),
                ("c3/volumes/0", lambda: sm.add_volume("c3", 0, host / "hosts", readonly=False)),
            ]
            for rel, attempt in cases:
                with pytest.raises(MountError, match="symlink") as exc:
                    attempt()
                assert exc.value.target == str(m / rel)
            assert list(sm) == sm.base  # nothing recorded for a container
            for victim in (cron, bindir, etc):
                assert not is_mount_point(victim)
            assert not (etc / "passwd").exists()
        finally:
            sm.teardown()
        _assert_nothing_left(host)

    in_private_mount_ns(body)


def test_unmount_goes_by_record_not_by_path(tmp_path: Path) -> None:
    """A mount point's path is changed after the mount (a rename and a symlink where it was):
    release still unmounts the mount that was made, and touches nothing at the symlink's target."""
    def body() -> None:
        host = tmp_path / "host"
        host.mkdir()
        make_shared_host_root(str(host))
        (host / "data").mkdir()
        victim = host / "victim"
        victim.mkdir()
        mount("tmpfs", str(victim), "tmpfs")
        sm = _sandbox(host)
        try:
            os.mkdir(sm.mounts_dir / "c1")
            sm.add_volume("c1", 0, host / "data", readonly=False)
            os.rename(sm.mounts_dir / "c1" / "volumes", sm.mounts_dir / "c1" / "moved")
            os.symlink(victim, sm.mounts_dir / "c1" / "volumes")
            sm.release("c1")
            assert not is_mount_point(sm.mounts_dir / "c1" / "moved" / "0")
            assert is_mount_point(victim)
        finally:
            sm.teardown()
        _assert_nothing_left(host, victim)

    in_private_mount_ns(body)


@pytest.mark.parametrize("new_api", [True, False], ids=["mount_setattr", "walk"])
def test_read_only_volume_is_read_only_all_the_way_down(tmp_path: Path, new_api: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mountapi, "use_new_mount_api", new_api)

    def body() -> None:
        host = tmp_path / "host"
        host.mkdir()
        make_shared_host_root(str(host))
        src = host / "data"
        (src / "sub" / "deeper").mkdir(parents=True)
        mount("tmpfs", str(src / "sub"), "tmpfs", 0x400)  # noatime: kept by the read-only remount
        (src / "sub" / "deeper").mkdir()
        mount("tmpfs", str(src / "sub" / "deeper"), "tmpfs")
        sm = _sandbox(host)
        try:
            os.mkdir(sm.mounts_dir / "c1")
            sm.add_volume("c1", 0, src, readonly=True)
            for view in (sm.mounts_dir, sm.shared_dir):
                vol = view / "c1" / "volumes" / "0"
                for d in (vol, vol / "sub", vol / "sub" / "deeper"):
                    with pytest.raises(OSError) as exc:
                        (d / "x").write_text("no")
                    assert exc.value.errno == errno.EROFS, d
                    flags = os.statvfs(d).f_flag
                    assert flags & os.ST_NOSUID and flags & os.ST_NODEV and flags & os.ST_NOEXEC, d
                assert os.statvfs(vol / "sub").f_flag & os.ST_NOATIME
            (src / "sub" / "x").write_text("the source stays writable")
        finally:
            sm.teardown()
        _assert_nothing_left(host, src / "sub", src / "sub" / "deeper")

    in_private_mount_ns(body)


@pytest.mark.parametrize("new_api", [True, False], ids=["mount_setattr", "walk"])
def test_volume_propagation_is_private_unless_asked(tmp_path: Path, new_api: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, volumes joined the host root's peer group: every mount namespace copied from it saw
    each pod's volumes, and host mounts showed up in the guest. `peer` stands for such a namespace."""
    def body() -> None:
        host, peer = tmp_path / "host", tmp_path / "peer"
        host.mkdir()
        peer.mkdir()
        make_shared_host_root(str(host))
        mount(str(host), str(peer), None, 0x1000)  # a bind of a shared mount: a peer of it
        (host / "data" / "later").mkdir(parents=True)
        (host / "data2" / "later").mkdir(parents=True)
        sm = _sandbox(host)
        try:
            os.mkdir(sm.mounts_dir / "c1")
            sm.add_volume("c1", 0, host / "data", readonly=False)
            sm.add_volume("c1", 1, host / "data2", readonly=False, propagation="rslave")
            vol0 = sm.mounts_dir / "c1" / "volumes" / "0"
            # nothing of the sandbox reaches the peer namespace beyond its (empty) directory
            peer_sb = peer / sm.dir.relative_to(host)
            assert [p for p in mounts.mounts_under(peer_sb) if p != peer_sb] == []
            # a host mount made below the source later does not appear in the private volume...
            mount("tmpfs", str(host / "data" / "later"), "tmpfs")
            assert not is_mount_point(vol0 / "later")
            assert not is_mount_point(sm.shared_dir / "c1" / "volumes" / "0" / "later")
            # ... nor does a mount below the volume appear at the source
            (vol0 / "inner").mkdir()
            mount("tmpfs", str(vol0 / "inner"), "tmpfs")
            assert not is_mount_point(host / "data" / "inner")
            # rslave asked for: host mounts below the source do reach the volume
            mount("tmpfs", str(host / "data2" / "later"), "tmpfs")
            assert is_mount_point(sm.mounts_dir / "c1" / "volumes" / "1" / "later")
            # rshared asked for (Kubernetes' Bidirectional): a mount below the volume reaches the source
            (host / "data3" / "inner").mkdir(parents=True)
            sm.add_volume("c1", 2, host / "data3", readonly=False, propagation="rshared")
            mount("tmpfs", str(sm.mounts_dir / "c1" / "volumes" / "2" / "inner"), "tmpfs")
            assert is_mount_point(host / "data3" / "inner")
            mounts.unmount(host / "data3" / "inner")
            with pytest.raises(MountError, match="propagation"):
                sm.add_volume("c1", 2, host / "data", readonly=False, propagation="unbindable")
        finally:
            sm.teardown()
        _assert_nothing_left(peer, peer / "data" / "later", peer / "data2" / "later")
        _assert_nothing_left(host, host / "data" / "later", host / "data2" / "later")

    in_private_mount_ns(body)


def test_suid_binary_and_device_node_in_a_volume_are_useless_to_host_users() -> None:
    """What a guest can leave in a volume or its root through a shared tree (a setuid binary, a
    0666 device node) cannot be used through any mount pykata makes: every one is nosuid,nodev
    (shown with the 0700 sandbox directory opened up, so the mount flags alone are tested; the
    same files reached through a mount without those flags show the attack works there)."""
    # a directory a host user can traverse (pytest's tmp_path is below a 0700 directory)
    host = Path(tempfile.mkdtemp(prefix="pykata-suid-"))
    os.chmod(host, 0o755)

    def body() -> None:
        make_shared_host_root(str(host))
        src = host / "data"
        src.mkdir(mode=0o755)
        # owned by a non-root user, so the effect of setuid shows as a uid and proves nothing else
        shutil.copy("/usr/bin/id", src / "suid-id")
        os.chown(src / "suid-id", 1234, 1234)
        os.chmod(src / "suid-id", 0o4755)
        os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(src / "null", 0o666)
        sm = _sandbox(host)
        try:
            os.mkdir(sm.mounts_dir / "c1")
            sm.add_volume("c1", 0, src, readonly=False)
            for mp in sm:
                flags = os.statvfs(mp.path).f_flag
                assert flags & os.ST_NOSUID and flags & os.ST_NODEV, mp.path
            for d in (host / "run", sm.dir.parent.parent, sm.dir.parent, sm.dir):
                os.chmod(d, 0o755)
            # control: through a mount without nosuid/nodev the attack works
            assert _as_nobody(str(src / "suid-id"), "-u").stdout.strip() == "1234"
            assert _as_nobody("sh", "-c", f"echo x > {src / 'null'}").returncode == 0
            for view in (sm.mounts_dir, sm.shared_dir):
                vol = view / "c1" / "volumes" / "0"
                res = _as_nobody(str(vol / "suid-id"), "-u")
                assert res.stdout.strip() != "1234", res  # noexec: not even run; never as 1234
                res = _as_nobody("sh", "-c", f"echo x > {vol / 'null'}")
                assert res.returncode != 0 and "Permission denied" in res.stderr, res
        finally:
            sm.teardown()
        _assert_nothing_left(host)

    try:
        in_private_mount_ns(body)
    finally:
        os.rmdir(host)  # the tmpfs with the files was the child namespace's only
