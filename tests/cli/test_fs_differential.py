"""Filesystem semantics on a container's root, runc vs pykata on the same bundle: a static probe
(data/fsprobe.c: Unix socket bind, mkfifo/mknod, MAP_SHARED mmap incl. a sparse file past 4 GiB,
utimensat with explicit nanoseconds by path/fd/nofollow/dir, user.* xattrs, OFD and POSIX locks at
64-bit offsets, truncate of an open file, O_TMPFILE, fallocate, sparse files, rename/link/unlink of
open files, statfs) prints one line per check; both runtimes must print the same lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pykata.images import ImageStore
from pykata.sandbox import build_spec

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")
PROBE = Path(__file__).with_name("data") / "fsprobe.c"
pytestmark = [pytest.mark.vm]

# Differences left, each with its cause, and the line pykata prints for it: when the cause goes (a
# newer guest kernel), the line changes and this test asks for the entry to be removed.
KNOWN_DIFFERENCES = {
    # the writable layer is a guest tmpfs; tmpfs has user.* xattrs from Linux 6.6, the guest runs 6.1
    "xattr-user": "xattr-user: setxattr (Operation not supported)",
    # overlayfs supports O_TMPFILE from Linux 6.6
    "o-tmpfile": "o-tmpfile: open (Operation not supported)",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdiff")
    rootfs = ImageStore(tmp / "cache").resolve("busybox").rootfs
    bundle = tmp / "bundle"
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(bundle / "rootfs/bin/fsprobe"), str(PROBE)], check=True)
    _image_files(bundle / "rootfs/imgfiles")
    spec = build_spec(["/bin/fsprobe"], env=["PATH=/bin"], cwd="/", user=(0, 0), hostname="fsdiff")
    spec["linux"]["resources"] = {}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _image_files(d: Path) -> None:
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


def test_root_filesystem_semantics_same_as_runc(bundle: Path, tmp_path: Path) -> None:
    cid = f"fsdiff-{uuid.uuid4().hex[:8]}"
    try:
        runc = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, timeout=120,
                              cwd=tmp_path, text=True)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    # runc wrote into the bundle's rootfs/tmp; pykata starts from the same, cleaned, image
    for p in (bundle / "rootfs/tmp").iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    pyk = subprocess.run([PYKATA, "run", "--rm", str(bundle)], capture_output=True, timeout=180, cwd=tmp_path,
                         text=True)
    assert runc.returncode == 0, runc.stderr
    assert len(runc.stdout.splitlines()) >= 20, runc.stdout
    assert all(": ok" in line or "time" in line or "size" in line or "lock-ofd" in line
               for line in runc.stdout.splitlines()), runc.stdout
    assert pyk.returncode == runc.returncode, pyk.stderr
    theirs = runc.stdout.splitlines()
    ours = pyk.stdout.splitlines()
    assert [line.partition(":")[0] for line in ours] == [line.partition(":")[0] for line in theirs], pyk.stdout
    for mine, want in zip(ours, theirs, strict=True):
        check = mine.partition(":")[0]
        if check in KNOWN_DIFFERENCES:
            assert mine in (KNOWN_DIFFERENCES[check], want), f"{check}: {mine!r}: update KNOWN_DIFFERENCES"
        else:
            assert mine == want
