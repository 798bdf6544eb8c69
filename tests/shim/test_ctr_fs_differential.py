"""Filesystem semantics through containerd, runc vs pykata: the probe of tests/cli/test_fs_differential.py
(data/fsprobe.c) in an image imported into a private containerd and started with `ctr run`, under the
default configuration, on the container's root (containerd's overlay snapshot: the guest gets its layers
as a read-only disk and a writable layer of its own) and on a host directory given with `ctr run --mount`
(a hostPath volume). Both runtimes must print the same lines but for the known differences, each with its
cause, which the `pykata run` battery names."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from pykata.images import ImageStore
from tests.cli.test_fs_differential import (
    KNOWN_DIFFERENCES,
    PROBE,
    TMPFS_FALLOCATE,
    VOLUME_KNOWN_DIFFERENCES,
    image_files,
    same_but_known,
)
from tests.security.imagekit import archive_of, oci_image
from tests.shim.harness import PYKATA_RUNTIME, RUNC_RUNTIME, Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]

IMAGE = "docker.io/library/pykata-fsprobe:latest"

# runc under containerd runs on the overlay snapshotter's mount, which reports 1 link for a directory in
# both layers too (/tmp once written): the same line, so no difference left there
CTR_ROOT_KNOWN = {k: v for k, v in KNOWN_DIFFERENCES.items() if k != "dir-nlink-cwd"}


def _layer(root: Path) -> bytes:
    """`root` as one image layer, as a build tool writes it: owners, modes, hard links, FIFOs, symlinks,
    xattrs (security.capability) and nanosecond times in PAX headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path in sorted(root.rglob("*")):
            info = t.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.uname = info.gname = ""
            st = path.lstat()
            pax = {"mtime": f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"}
            if not path.is_symlink():
                for name in os.listxattr(path):
                    pax[f"SCHILY.xattr.{name}"] = os.getxattr(path, name).decode("latin-1")
            info.pax_headers = pax
            if info.isreg():
                with open(path, "rb") as f:
                    t.addfile(info, f)
            else:
                t.addfile(info)
    return buf.getvalue()


def _archive(layer: bytes, out: Path) -> Path:
    layout, _ = oci_image(out.with_suffix(".layout"), [layer], ref_name=IMAGE,
                          config={"Cmd": ["/bin/fsprobe"], "Env": ["PATH=/bin"]})
    return archive_of(layout, out)


@pytest.fixture(scope="module")
def probe_image(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("fsprobe-image")
    root = tmp / "rootfs"
    shutil.copytree(ImageStore(tmp / "cache").resolve("busybox").rootfs, root, symlinks=True)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(root / "bin/fsprobe"), str(PROBE)], check=True)
    image_files(root / "imgfiles")
    (root / "vol").mkdir()
    archive = _archive(_layer(root), tmp / "fsprobe.tar")
    containerd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
    shutil.rmtree(tmp)
    return IMAGE


def _run_both(containerd: Containerd, image: str, written: Path | None, where: str | None = None,
              *args: str, runc_lacks: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """`ctr run --rm` the probe (in `where`, else /tmp) under runc, empty `written` (what runc left in the
    volume), then under pykata; both outputs' lines, after checking that every check but `runc_lacks`
    passed under runc."""
    out = {}
    for runtime in (RUNC_RUNTIME, PYKATA_RUNTIME):
        cid = f"fsdiff-{uuid.uuid4().hex[:8]}"
        try:
            p = containerd.ctr("run", "--rm", "--runtime", runtime, *args, image, cid, "/bin/fsprobe",
                               *([where] if where else []), timeout=300)
        finally:
            containerd.remove(cid)
        out[runtime] = p.stdout.decode(errors="replace").splitlines()
        if written is not None:
            for p_ in written.iterdir():
                shutil.rmtree(p_) if p_.is_dir() and not p_.is_symlink() else p_.unlink()
    theirs, ours = out[RUNC_RUNTIME], out[PYKATA_RUNTIME]
    assert len(theirs) >= 20, theirs
    assert not [line for line in theirs if "(" in line and line.partition(":")[0] not in runc_lacks], theirs
    return theirs, ours


def test_ctr_root_semantics_same_as_runc(containerd: Containerd, probe_image: str) -> None:
    theirs, ours = _run_both(containerd, probe_image, None)
    same_but_known(theirs, ours, CTR_ROOT_KNOWN)


def test_ctr_mount_volume_semantics_differences_are_known(containerd: Containerd, probe_image: str,
                                                          tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    theirs, ours = _run_both(containerd, probe_image, volume, "/vol", "--mount",
                             f"type=bind,src={volume},dst=/vol,options=rbind:rw")
    same_but_known(theirs, ours, VOLUME_KNOWN_DIFFERENCES)


def test_ctr_dev_shm_semantics_same_as_runc(containerd: Containerd, probe_image: str) -> None:
    """/dev/shm, containerd's 64 MiB tmpfs in every container (shm_open, POSIX semaphores: Python's
    multiprocessing, PostgreSQL's dynamic shared memory): a tmpfs on both sides, so the fallocate modes
    tmpfs lacks fail under runc too, and it is mounted noexec (a script there exits 126, an executable
    mapping fails with EPERM) on both sides."""
    theirs, ours = _run_both(containerd, probe_image, None, "/dev/shm",
                             runc_lacks=frozenset({*TMPFS_FALLOCATE, "mmap-exec"}))
    assert "exec-script: exit 126" in theirs, theirs
    same_but_known(theirs, ours, {})
