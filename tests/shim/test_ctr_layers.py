"""An image of several layers through containerd (its overlay snapshots), runc vs pykata: pykata gives the
guest the merged layers as a read-only disk, so whiteouts, opaque directories, hard links, owners,
setuid bits, file capabilities and times must come out as runc shows them."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from pykata.images import ImageStore
from tests.shim.harness import PYKATA_RUNTIME, RUNC_RUNTIME, Containerd

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]

IMAGE = "docker.io/library/pykata-layers:latest"
CAP = bytes.fromhex("0100000200040000000000000000000000000000")
# what the container prints: the merged tree below /l, owners, modes, links, times, the capability
PROBE = ("ls -la --full-time /l /l/data /l/opq /l/links; stat -c '%n %a %u:%g %h %i' /l/links/*;"
         " [ -e /l/data/gone ] && echo GONE-VISIBLE; [ -e /l/opq/old ] && echo OPAQUE-BROKEN;"
         " cat /l/opq/new /l/data/keep; ls /l/data/ | wc -l")


def _layer(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644, uid: int = 0,
           gid: int = 0, link: str = "", pax: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, gid, link
    info.mtime = 1_600_000_000
    if pax:
        info.pax_headers = pax
    return info, data


def _archive(base: Path, out: Path) -> Path:
    """busybox, then a layer with files, then one that whites some out and makes a directory opaque."""
    busy = io.BytesIO()
    with tarfile.open(fileobj=busy, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path in sorted(base.rglob("*")):
            info = t.gettarinfo(str(path), arcname=str(path.relative_to(base)))
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    t.addfile(info, f)
            else:
                t.addfile(info)
    d = tarfile.DIRTYPE
    layers = [busy.getvalue(), _layer([
        _entry("l", d, mode=0o755), _entry("l/data", d, mode=0o750, uid=7, gid=8),
        _entry("l/data/keep", data=b"kept\n"), _entry("l/data/gone", data=b"x"),
        _entry("l/opq", d, mode=0o755), _entry("l/opq/old", data=b"old"),
        _entry("l/links", d, mode=0o755),
        _entry("l/links/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678,
               pax={"SCHILY.xattr.security.capability": CAP.decode("latin-1")}),
        # a hard link's header carries its file's metadata too (containerd applies it to the inode)
        _entry("l/links/alias", tarfile.LNKTYPE, link="l/links/tool", mode=0o4755, uid=1234, gid=5678,
               pax={"SCHILY.xattr.security.capability": CAP.decode("latin-1")}),
        _entry("l/links/sym", tarfile.SYMTYPE, link="../data/keep"),
    ]), _layer([
        _entry("l/data/.wh.gone"), _entry("l/opq/.wh..wh..opq"), _entry("l/opq/new", data=b"new\n"),
    ])]

    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    blobs = [blob(x) for x in layers]
    config = blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                              "rootfs": {"type": "layers", "diff_ids": [d for d, _ in blobs]}}).encode())
    manifest = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0],
                   "size": len(config[1])},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": dg, "size": len(b)}
                   for dg, b in blobs]}).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest[0], "size": len(manifest[1]),
         "annotations": {"org.opencontainers.image.ref.name": IMAGE}}]}
    with tarfile.open(out, "w") as t:
        files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", json.dumps(index).encode()),
                 *((f"blobs/sha256/{dg.split(':')[1]}", b) for dg, b in [*blobs, config, manifest])]
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out


def test_layers_whiteouts_links_and_capabilities_same_as_runc(containerd: Containerd, tmp_path: Path) -> None:
    base = ImageStore(tmp_path / "cache").resolve("busybox").rootfs
    archive = _archive(base, tmp_path / "layers.tar")
    containerd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
    seen = {}
    for runtime in (RUNC_RUNTIME, PYKATA_RUNTIME):
        cid = f"layers-{uuid.uuid4().hex[:8]}"
        try:
            out = containerd.ctr("run", "--rm", "--runtime", runtime, IMAGE, cid, "sh", "-c", PROBE)
        finally:
            containerd.remove(cid)
        seen[runtime] = out.stdout.decode(errors="replace")
    runc, pykata = seen[RUNC_RUNTIME], seen[PYKATA_RUNTIME]
    assert "GONE-VISIBLE" not in runc and "OPAQUE-BROKEN" not in runc and "kept" in runc, runc
    assert "4755 1234:5678 2" in runc, runc
    assert "GONE-VISIBLE" not in pykata and "OPAQUE-BROKEN" not in pykata, pykata
    # inode numbers and `ls`'s block totals are the file system's (the host's overlay, the guest's
    # disk); the rest must not differ
    assert _comparable(pykata) == _comparable(runc), f"runc:\n{runc}\npykata:\n{pykata}"


def _comparable(text: str) -> list[str]:
    """What must match: inode numbers, `ls`'s block totals and a directory's link count and size are the
    file system's (runc's host overlay reports 1 link for a merged directory, the guest's disk the
    real count), and the container root (`..` of /l) is the writable layer's (a guest tmpfs)."""
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if line.startswith("total ") or (fields and fields[-1] == ".." and line.startswith("d")):
            continue
        if line.startswith("/l/links/"):
            fields = fields[:-1]
        elif line.startswith("d") and len(fields) > 5:
            fields = [fields[0], *fields[2:4], *fields[5:]]
        lines.append(" ".join(fields))
    return lines


def test_a_root_whose_disk_is_built_is_not_mounted_on_the_host(containerd: Containerd, tmp_path: Path) -> None:
    """The host mounts a containerd root (mounts/<cid>/rootfs) only to build its image disk: a later
    container of the image gets the disk without a host mount, and its root (the mode of /, the
    merged layers) is as runc shows it."""
    base = ImageStore(tmp_path / "cache").resolve("busybox").rootfs
    containerd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(_archive(base, tmp_path / "l.tar")))
    probe = "stat -c '%a %u:%g' / /l /l/data; cat /l/opq/new /l/data/keep"
    seen = []
    cids = [f"built-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    try:
        runc = containerd.ctr("run", "--rm", "--runtime", RUNC_RUNTIME, IMAGE, cids[0], "sh", "-c", probe)
        first = containerd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, cids[1], "sh", "-c", probe)
        containerd.ctr("run", "-d", "--runtime", PYKATA_RUNTIME, IMAGE, cids[2], "sh", "-c", f"{probe}; sleep 600")
        mounts = Path("/proc/self/mountinfo").read_text()
        assert f"/mounts/{cids[2]}/" not in mounts, [ln for ln in mounts.splitlines() if cids[2] in ln]
        again = containerd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, IMAGE, cids[0], "sh", "-c", probe)
        seen = [x.stdout.decode(errors="replace") for x in (runc, first, again)]
    finally:
        for cid in cids:
            containerd.remove(cid)
    assert seen[0] == seen[1] == seen[2] and "new\nkept" in seen[0], seen
