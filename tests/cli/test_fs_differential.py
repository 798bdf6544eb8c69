"""Filesystem semantics on a container's root, runc vs pykata on the same bundle: a static probe
(data/fsprobe.c: Unix socket bind, mkfifo/mknod, MAP_SHARED mmap incl. sparse files around 2 and past
4 GiB, utimensat with explicit nanoseconds by path/fd/nofollow/dir and of mtime or atime alone, user.* xattrs
set/replace/get/list/remove on a new file, a directory and an image file, OFD and POSIX locks at 64-bit
offsets (also as another process sees them), truncate of an open file, O_TMPFILE + linkat, fallocate (punch
hole, keep size, zero range, collapse), sparse files and SEEK_DATA/SEEK_HOLE, rename/link/unlink of open
files and what is done through the descriptor of a file unlinked or renamed over, statfs, inotify events of
the container's own changes on a directory and on a file with a second name, directory link counts, flock
(also beside a POSIX lock), renameat2 flags, chown/chmod by root and what a non-root process may do, two
processes' MAP_SHARED mappings, fsync of a directory, O_DIRECT, copy_file_range, UTIME_NOW, removing
entries while reading the directory) prints one line per check; both runtimes must print the same lines.
Run on the container's root, on a read-write host volume, and in a CRI pod's emptyDir
(tests/shim/test_ctr_fs_differential.py runs it through containerd)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.images import ImageStore
from pykata.resources.emptydir import EMPTY_DIR_PLUGIN, SANDBOX_UID_ANNOTATION
from pykata.sandbox import Volume, build_spec
from pykata.sandbox.ocispec import add_volumes
from tests.cri.harness import admin_config

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")
PROBE = Path(__file__).with_name("data") / "fsprobe.c"
pytestmark = [pytest.mark.vm]

# fallocate modes tmpfs does not have (Linux 6.12's shmem_fallocate: EOPNOTSUPP), where ext4 does
TMPFS_FALLOCATE = {
    "fallocate-zero-range": "fallocate-zero-range: zero range (Operation not supported)",
    "fallocate-zero-range-keep": "fallocate-zero-range-keep: zero range (Operation not supported)",
    "fallocate-collapse": "fallocate-collapse: collapse range (Operation not supported)",
}

# Differences left, each with its cause, and the exact line pykata prints for it.
KNOWN_DIFFERENCES = {
    # The container's root is an overlay (image below, writable layer above), and overlayfs reports 1 link
    # for a directory that is in both layers (/tmp once the container wrote into it); runc here runs on a
    # plain bundle directory and shows the real count, but runc under containerd, whose overlayfs
    # snapshotter mounts the same kind of overlay, shows 1 too. Kept: it is what containerd users see, and
    # `find` and friends take nlink=1 to mean "do not count subdirectories".
    "dir-nlink-cwd": "dir-nlink-cwd: 1",
    # The container's writable layer is a guest tmpfs (runc's: the host's ext4 here), and tmpfs has no
    # FALLOC_FL_ZERO_RANGE or FALLOC_FL_COLLAPSE_RANGE (mm/shmem.c takes punch hole and keep size only).
    **TMPFS_FALLOCATE,
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdiff")
    rootfs = ImageStore(tmp / "cache").resolve("busybox").rootfs
    bundle = tmp / "bundle"
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(bundle / "rootfs/bin/fsprobe"), str(PROBE)], check=True)
    image_files(bundle / "rootfs/imgfiles")
    spec = build_spec(["/bin/fsprobe"], env=["PATH=/bin"], cwd="/", user=(0, 0), hostname="fsdiff")
    spec["linux"]["resources"] = {}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def image_files(d: Path) -> None:
    """Files in the image the probe stats (image-*): a file capability, setuid with owners, hard links,
    a FIFO, a symlink, nanosecond times; pykata serves them from the image's disk."""
    d.mkdir()
    (d / "capfile").write_bytes(b"cap")
    # cap_net_bind_service, permitted + effective (VFS_CAP_REVISION_2)
    os.setxattr(d / "capfile", "security.capability", bytes.fromhex("0100000200040000000000000000000000000000"))
    (d / "suid").write_bytes(b"x" * 5000)
    os.chown(d / "suid", 1234, 5678)
    os.chmod(d / "suid", 0o4711)
    (d / "hl1").write_bytes(b"same")
    os.link(d / "hl1", d / "hl2")
    os.mkfifo(d / "fifo", 0o640)
    (d / "link").symlink_to("/nowhere/at/all")
    for i, name in enumerate(("capfile", "suid", "hl1", "fifo")):
        os.utime(d / name, ns=(1_500_000_000_111_111_111 + i, 1_600_000_000_123_456_789 + i))
    os.chmod(d, 0o751)
    os.utime(d, ns=(1_500_000_000_000_000_001, 1_600_000_000_000_000_002))
    # a file of the image the probe sets user.* xattrs on (copied up), alone in its directory so the
    # copy-up of that directory changes nothing the image-* checks print
    (d.parent / "imgxattr").mkdir()
    (d.parent / "imgxattr/file").write_bytes(b"image file")


@contextlib.contextmanager
def host_locks(directory: Path) -> Iterator[None]:
    """A POSIX lock on `directory`/host-posix and a flock on host-flock, held by this (host) process while
    the container runs: the probe's host-lock-* rows try to take them."""
    with open(directory / "host-posix", "w") as posix, open(directory / "host-flock", "w") as bsd:
        fcntl.lockf(posix, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(bsd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def _run_both(bundle: Path, tmp_path: Path, written: Path, env: dict[str, str] | None = None,
              run_args: tuple[str, ...] = (), runc_lacks: frozenset[str] = frozenset(),
              locked: bool = False) -> tuple[list[str], list[str]]:
    """Run the bundle under runc, empty `written` (what runc's run left on the host), run it under pykata;
    return both outputs' lines after checking that every check but `runc_lacks` passed under runc. With
    `locked`, host_locks(written) is held during each run."""
    cid = f"fsdiff-{uuid.uuid4().hex[:8]}"
    try:
        with host_locks(written) if locked else contextlib.nullcontext():
            runc = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, timeout=120,
                                  cwd=tmp_path, text=True)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    for p in written.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    with host_locks(written) if locked else contextlib.nullcontext():
        pyk = subprocess.run([PYKATA, "run", "--rm", *run_args, str(bundle)], capture_output=True, timeout=180,
                             cwd=tmp_path, text=True, env=env)
    assert runc.returncode == 0, runc.stderr
    assert len(runc.stdout.splitlines()) >= 20, runc.stdout
    # a failed check prints "name: what (strerror)"; every check passes under runc
    assert not [line for line in runc.stdout.splitlines() if "(" in line and line.partition(":")[0] not in runc_lacks
                ], runc.stdout
    assert pyk.returncode == runc.returncode, pyk.stderr
    return runc.stdout.splitlines(), pyk.stdout.splitlines()


def same_but_known(theirs: list[str], ours: list[str], known: dict[str, str]) -> None:
    """Each of pykata's lines is runc's, or for a known difference exactly the line known; names every
    line that is neither (a known difference that went away too: update the known differences)."""
    assert [line.partition(":")[0] for line in ours] == [line.partition(":")[0] for line in theirs], ours
    wrong = [f"{mine!r} (runc: {want!r}, known: {known.get(mine.partition(':')[0])!r})"
             for mine, want in zip(ours, theirs, strict=True) if mine != known.get(mine.partition(":")[0], want)]
    assert not wrong, "\n".join(wrong)


def test_root_filesystem_semantics_same_as_runc(bundle: Path, tmp_path: Path) -> None:
    # runc wrote into the bundle's rootfs/tmp; pykata starts from the same, cleaned, image
    theirs, ours = _run_both(bundle, tmp_path, bundle / "rootfs/tmp")
    same_but_known(theirs, ours, KNOWN_DIFFERENCES)


# A container whose image layers come through the shared directory instead of an image disk (beyond the
# VM's rootfs_block_slots: a pod's fifth image under the default configuration, since containers of one
# image share a slot; a containerd snapshot that already holds files; rootfs_block_slots = 0): its root's
# lower layer is the host's directory over 9p, and the guest kernel is built without
# CONFIG_9P_FS_SECURITY (kernel.config), so a security.* xattr of the image cannot be read there: a file
# capability (setcap'd ping, or a server that binds port 80 as a non-root user) is lost (EOPNOTSUPP; the
# file runs without it). Enabling it would also send the guest's security.* writes to the host's file
# server. Everything else is as on an image disk.
SHARED_ROOT_KNOWN_DIFFERENCES = {
    **KNOWN_DIFFERENCES,
    "image-capability": "image-capability: getxattr (Operation not supported)",
}


def test_root_through_the_shared_directory_differences_are_known(bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYKATA_CONFIG": str(admin_config(tmp_path / "pykata.toml", rootfs_block_slots="0"))}
    theirs, ours = _run_both(bundle, tmp_path, bundle / "rootfs/tmp", env)
    same_but_known(theirs, ours, SHARED_ROOT_KNOWN_DIFFERENCES)


# What a host file server (9p or virtio-fs) refuses on purpose: a setuid/setgid mode on the host
# (pykata.hypervisor.fileguard's seccomp filter fails such a chmod with EPERM; runc's bind mount takes it,
# though a host mount of the volume elsewhere may be nosuid). chmod of another user's file, chown and the
# rest of the mode bits are as under runc.
HOST_FILE_SERVER = {"chmod-setuid": "chmod-setuid: chmod (Operation not permitted)"}
# The probe's host-lock-* rows, when the test holds a POSIX lock and a flock from the host (host_locks):
# runc's container is refused both; pykata's guest takes them (see each file server's reason below).
HOST_LOCKS_UNSEEN = {"host-lock-posix": "host-lock-posix: granted", "host-lock-flock": "host-lock-flock: granted"}

# A read-write volume (a host directory: hostPath, `-v`) is shared with the guest by the host's file
# server, 9p in the templated VMs `pykata run` starts from; these are its differences from runc's bind
# mount, each with its cause, and the exact line pykata prints. FIFOs, Unix sockets, locks, writable
# MAP_SHARED (hypervisor.qemu.virtio_9p_cache = "mmap"), inotify of the container's own changes on a
# directory and on a file, its IN_DELETE_SELF included (the guest's 9p client reuses the inode it holds
# and drops a link on unlink: guestimage/kernel.py SOURCE_EDITS), POSIX ACLs (access and a directory's
# default, inherited: the mount's `posixacl`), O_TMPFILE with O_EXCL (its mode from the umask or the
# default ACL) and the rest behave as under runc.
VOLUME_KNOWN_DIFFERENCES = {
    # atime's nanoseconds set over 9p are mtime's: QEMU 7.2's 9p-proxy.c (v9fs_request, T_UTIME) marshals
    # mtime's tv_nsec in atime's place on its way to virtfs-proxy-helper (the jailed QEMU's 9p backend).
    # mtime is exact (the guest kernel's 9p client keeps nanoseconds: guestimage/kernel.py SOURCE_EDITS).
    "utime-path": "utime-path: atime 1000000001.987654321 mtime 2000000002.987654321",
    "utime-fd": "utime-fd: atime 1000000001.999999999 mtime 2000000002.999999999",
    "utime-nofollow": "utime-nofollow: atime 1000000001.999999999 mtime 3.999999999",
    "utime-dir": "utime-dir: atime 1000000001.999999999 mtime 4.999999999",
    # one time alone (touch -m/-a, rsync): the other one's seconds stay (the guest's 9p client sends it as
    # the server has it: QEMU 7.2's v9fs_setattr leaves an omitted time's seconds unset, which set atime to
    # garbage, and an atime alone was not set at all), but atime's nanoseconds become mtime's, as above
    "utime-mtime-only-ns": "utime-mtime-only-ns: atime nanoseconds changed",
    "utime-atime-only-ns": "utime-atime-only-ns: atime nanoseconds 555555555",
    # QEMU's 9p server takes an xattr written with an empty value as a removal (v9fs_xattr_fid_clunk: a
    # Txattrcreate of size 0 removes); the protocol has no other way to say "set, empty"
    "xattr-user": "xattr-user: setxattr empty (No data available)",
    "xattr-user-dir": "xattr-user-dir: setxattr empty (No data available)",
    # O_TMPFILE without O_EXCL: 9P2000.L links by path (Tlink), so a file with no name can never get one
    # and linkat() could not work; the guest's 9p client refuses such an open (a program takes its
    # fallback). O_TMPFILE|O_EXCL, which is never linked, is a name created open and removed at once
    # (guestimage/kernel.py SOURCE_EDITS) and matches runc.
    "o-tmpfile": "o-tmpfile: open (Operation not supported)",
    "o-tmpfile-linkat": "o-tmpfile-linkat: open (Operation not supported)",
    # 9P2000.L has no fallocate message: the guest's 9p client stands in for it (guestimage/kernel.py
    # SOURCE_EDITS, _NINE_P_FALLOCATE) with zeros written over the range (punch hole, zero range) or past
    # the end (allocation), so reads, sizes and allocated blocks are as under runc, but a punched hole keeps
    # its blocks on the host, and modes that move data (collapse, insert) stay EOPNOTSUPP. Nor is there a
    # SEEK_DATA/SEEK_HOLE message: the client answers them generically (all data).
    "fallocate-punch-blocks": "fallocate-punch-blocks: kept",
    "fallocate-collapse": "fallocate-collapse: collapse range (Operation not supported)",
    "sparse-seek": "sparse-seek: data 0 hole 3221225473",
    # QEMU's 9p server gives st_blksize as its I/O unit (the largest multiple of the host file's st_blksize
    # that fits msize: stat_to_iounit), and the guest's 9p client passes it on. Programs size their buffers
    # by it (one round trip per 496 KiB instead of per 4 KiB), but cp --sparse and tar -S write a hole only
    # for zeros that fill such a block: a copy of a sparse file keeps less of its holes (one 4 KiB block of
    # data in 200 MiB: 496 KiB allocated, runc 4 KiB; bench/real_software_ctr.py --suite apps, git_tar).
    # The data is the same; 4 KiB would cost 124 times the round trips for every sequential read.
    "st-blksize": "st-blksize: 507904",
    # QEMU 7.2's 9p server sets attributes (Tsetattr: size, mode, times, owners) and xattrs by the path its
    # fid was walked to, and has no message that reaches a file by its open fid alone: a file unlinked while
    # open cannot be truncated, chmod'ed, timed or given an xattr through its descriptor (ENOENT: the
    # path is gone; reads, writes and fstat go through the open file and work). After a rename over an
    # open file, the path names the new file: the guest kernel refuses these calls on a file with no name
    # left (guestimage/kernel.py SOURCE_EDITS, _NINE_P_NAMELESS_*) so they fail as for an unlinked file
    # instead of changing the file that took its name (they truncated it and changed its mode before).
    "unlinked-ftruncate": "unlinked-ftruncate: ftruncate (No such file or directory)",
    "unlinked-fchmod": "unlinked-fchmod: fchmod (No such file or directory)",
    "unlinked-futimens": "unlinked-futimens: futimens (No such file or directory)",
    "unlinked-fsetxattr": "unlinked-fsetxattr: fsetxattr (No such file or directory)",
    "rename-over-open-setattr": "rename-over-open-setattr: ftruncate failed fchmod failed",
    # 9P2000.L's rename cannot swap two names in one step: RENAME_EXCHANGE stays EINVAL (RENAME_NOREPLACE
    # works: guestimage/kernel.py SOURCE_EDITS, _NINE_P_RENAME_NOREPLACE)
    "rename-exchange": "rename-exchange: renameat2 (Invalid argument)",
    # A lock held outside the VM (the host, another pod on the same hostPath) is not seen: QEMU 7.2's 9p
    # server answers a TLOCK with success and takes no host lock, so locks are the guest's own (between
    # the containers of one pod they work, as the other lock rows show). Two pods or a pod and a host
    # program sharing an SQLite database on a hostPath do not exclude each other.
    **HOST_LOCKS_UNSEEN,
    **HOST_FILE_SERVER,
}


# What a process that is not root cannot do under runc either (a container with runAsUser): give a file
# away, or set an xattr on a root-owned file of the image; pykata must print the same failures.
NON_ROOT_REFUSED = frozenset({"chown", "xattr-user-image"})


def _volume_run(bundle: Path, tmp_path: Path, run_args: tuple[str, ...] = (),
                user: tuple[int, int] = (0, 0)) -> tuple[list[str], list[str]]:
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o777)
    spec = build_spec(["/bin/fsprobe", "/vol"], env=["PATH=/bin"], cwd="/", user=user, hostname="fsdiff")
    spec["linux"]["resources"] = {}
    spec = add_volumes(spec, [Volume(volume, "/vol", readonly=False)])
    # the same bundle (its image has a FIFO, which a copy would not take) with the volume's config
    config = bundle / "config.json"
    original = config.read_text()
    config.write_text(json.dumps(spec))
    try:
        return _run_both(bundle, tmp_path, volume, run_args=run_args,
                         runc_lacks=NON_ROOT_REFUSED if user[0] else frozenset(), locked=True)
    finally:
        config.write_text(original)


def test_volume_semantics_differences_are_known(bundle: Path, tmp_path: Path) -> None:
    theirs, ours = _volume_run(bundle, tmp_path)
    same_but_known(theirs, ours, VOLUME_KNOWN_DIFFERENCES)


def test_volume_semantics_as_a_non_root_user(bundle: Path, tmp_path: Path) -> None:
    """The probe as uid 1000 (runAsUser) in a world-writable host volume: the same differences as root's."""
    theirs, ours = _volume_run(bundle, tmp_path, user=(1000, 1000))
    assert "chown: chown (Operation not permitted)" in theirs, theirs
    same_but_known(theirs, ours, VOLUME_KNOWN_DIFFERENCES)


def test_root_filesystem_semantics_as_a_non_root_user(bundle: Path, tmp_path: Path) -> None:
    """The probe as uid 1000 in a world-writable directory of the image (/tmp/u): as root's."""
    spec = build_spec(["/bin/fsprobe", "/tmp/u"], env=["PATH=/bin"], cwd="/", user=(1000, 1000), hostname="fsdiff")
    spec["linux"]["resources"] = {}
    config = bundle / "config.json"
    original = config.read_text()
    config.write_text(json.dumps(spec))
    mine = bundle / "rootfs/tmp/u"
    mine.mkdir()
    mine.chmod(0o777)
    try:
        theirs, ours = _run_both(bundle, tmp_path, mine, runc_lacks=NON_ROOT_REFUSED)
    finally:
        config.write_text(original)
        shutil.rmtree(mine)
    assert "chown: chown (Operation not permitted)" in theirs, theirs
    same_but_known(theirs, ours, KNOWN_DIFFERENCES)


# The same volume over virtio-fs (`pykata run --shared-fs virtio-fs`, or a pod's annotation
# io.katacontainers.config.hypervisor.shared_fs = "virtio-fs": a cold-booted VM with virtiofsd). What
# differs from runc, each with its cause, and the exact line pykata prints.
VIRTIO_FS_VOLUME_KNOWN_DIFFERENCES = {
    # the guest's FUSE client (6.12) sends FUSE_TMPFILE; QEMU 7.2's virtiofsd does not implement it
    # (ENOSYS, which the client turns into EOPNOTSUPP)
    "o-tmpfile": "o-tmpfile: open (Operation not supported)",
    "o-tmpfile-linkat": "o-tmpfile-linkat: open (Operation not supported)",
    "o-tmpfile-excl": "o-tmpfile-excl: open (Operation not supported)",
    "o-tmpfile-excl-mode": "o-tmpfile-excl-mode: open (Operation not supported)",
    "o-tmpfile-excl-acl": "o-tmpfile-excl-acl: open (Operation not supported)",
    # the guest's FUSE client sends punch hole, zero range and keep size (fuse_file_fallocate) and refuses
    # the rest itself
    "fallocate-collapse": "fallocate-collapse: collapse range (Operation not supported)",
    # virtiofsd runs with its defaults no_posix_lock and no_flock: the guest's FUSE client keeps locks in
    # the guest, so one held on the host is not seen. Measured with virtio_fs_extra_args: "-o posix_lock"
    # makes the host's POSIX lock seen but fails every F_SETLKW with EOPNOTSUPP (lock-posix-wait: this
    # virtiofsd cannot wait) and F_GETLK's l_pid reads 0; "-o flock" makes LOCK_UN fail with EOPNOTSUPP.
    # So the defaults stay: locks work inside the pod, not across pods or with the host.
    **HOST_LOCKS_UNSEEN,
    **HOST_FILE_SERVER,
}


def test_volume_semantics_over_virtio_fs(bundle: Path, tmp_path: Path) -> None:
    theirs, ours = _volume_run(bundle, tmp_path, ("--shared-fs", "virtio-fs"))
    same_but_known(theirs, ours, VIRTIO_FS_VOLUME_KNOWN_DIFFERENCES)


# A CRI pod's emptyDir is made in the guest (a tmpfs: pykata.resources.emptydir); under runc it is the
# host directory kubelet made. What differs, each with its cause, and the exact line pykata prints: only
# the fallocate modes tmpfs lacks (tmpfs has user.* xattrs from Linux 6.6, and the guest kernel is 6.12).
EMPTYDIR_KNOWN_DIFFERENCES: dict[str, str] = {**TMPFS_FALLOCATE}


def test_emptydir_semantics_same_as_runc(bundle: Path, tmp_path: Path) -> None:
    """The probe in an emptyDir: runc on kubelet's host directory, pykata on the guest's tmpfs (the
    bundle carries the pod uid annotation CRI gives every container; the admin configuration names the
    kubelet root). The host directory stays empty under pykata."""
    uid = f"uid-fsdiff-{uuid.uuid4().hex[:6]}"
    kubelet = tmp_path / "kubelet"
    volume = kubelet / "pods" / uid / "volumes" / EMPTY_DIR_PLUGIN / "scratch"
    volume.mkdir(parents=True)
    volume.chmod(0o777)
    spec = build_spec(["/bin/fsprobe", "/vol"], env=["PATH=/bin"], cwd="/", user=(0, 0), hostname="fsdiff")
    spec["linux"]["resources"] = {}
    spec["annotations"] = {SANDBOX_UID_ANNOTATION: uid}
    spec = add_volumes(spec, [Volume(volume, "/vol", readonly=False)])
    env = {**os.environ, "PYKATA_CONFIG": str(admin_config(tmp_path / "pykata.toml",
                                                            kubelet_root_dir=f'"{kubelet}"'))}
    config = bundle / "config.json"
    original = config.read_text()
    config.write_text(json.dumps(spec))
    try:
        theirs, ours = _run_both(bundle, tmp_path, volume, env)
    finally:
        config.write_text(original)
    assert list(volume.iterdir()) == []
    same_but_known(theirs, ours, EMPTYDIR_KNOWN_DIFFERENCES)
