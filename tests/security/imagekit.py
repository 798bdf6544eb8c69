"""Builders of (malicious) images for the image security tests and the fuzzer: layers made with tarfile,
OCI layouts and archives with correct digests unless a test lies on purpose, and snapshots of the cache
and of a host directory that attacks aim at, to show nothing was created or left."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pykata.images.layers import remove_tree

Entry = tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def entry(name: str, kind: bytes, linkname: str = "", mode: int = 0o755, **attrs: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def directory(name: str) -> tarfile.TarInfo:
    return entry(name, tarfile.DIRTYPE)


def symlink(name: str, target: str) -> tarfile.TarInfo:
    return entry(name, tarfile.SYMTYPE, target, 0o777)


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    return entry(name, tarfile.LNKTYPE, target, 0o644)


def layer(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed tar made by tarfile from `entries` (TarInfo, or (TarInfo, data) for files)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for e in entries:
            if isinstance(e, tuple):
                t.addfile(e[0], io.BytesIO(e[1]))
            else:
                t.addfile(e)
    return buf.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


@dataclass
class Layout:
    """An OCI image layout being written: blobs by digest plus index.json."""

    path: Path
    blobs: dict[str, bytes] = field(default_factory=dict)

    def add(self, data: bytes) -> dict[str, object]:
        d = digest(data)
        self.blobs[d] = data
        return {"digest": d, "size": len(data)}

    def write(self, manifest_desc: dict[str, object], overrides: dict[str, bytes] | None = None) -> Path:
        """Write the layout; `overrides` replaces the content stored under a digest (a lie)."""
        blobs = self.path / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (self.path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_desc}]}))
        for d, data in {**self.blobs, **(overrides or {})}.items():
            (blobs / d.split(":")[1]).write_bytes(data)
        return self.path


def oci_image(path: Path, layers: list[bytes], *, diff_ids: list[str] | None = None,
              cmd: tuple[str, ...] = ("sh",), layer_sizes: list[int] | None = None,
              overrides: dict[str, bytes] | None = None,
              config: dict[str, object] | None = None, ref_name: str | None = None) -> tuple[Path, dict[str, object]]:
    """Write an OCI layout of `layers` (their bytes as stored: gzip or plain); returns it and the
    manifest's descriptor. diff_ids default to the right ones (of the gunzipped layers); `config`
    replaces the image config's "config" (how its process runs: {"Cmd": cmd} by default); `ref_name`:
    the index names the image so (what `ctr images import` takes the name from)."""
    lay = Layout(path)
    if diff_ids is None:
        diff_ids = [digest(gzip.decompress(x) if x[:2] == b"\x1f\x8b" else x) for x in layers]
    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **lay.add(x)} for x in layers]
    if layer_sizes is not None:
        for d, size in zip(descs, layer_sizes, strict=True):
            d["size"] = size
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": config or {"Cmd": list(cmd)},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      **lay.add(config)},
                           "layers": descs}).encode()
    desc = lay.add(manifest)
    if ref_name is not None:
        desc["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    return lay.write(desc, overrides), desc


def archive_of(layout: Path, out: Path) -> Path:
    """The layout directory as an OCI archive (a tarball)."""
    with tarfile.open(out, "w") as t:
        for p in sorted(layout.rglob("*")):
            t.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    return out


def tree(path: Path) -> dict[str, tuple[int, int, int, str]]:
    """Everything below `path`: relative name -> (mode, size, links, symlink target or sha256)."""
    out: dict[str, tuple[int, int, int, str]] = {}
    if not path.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            what = ""
            if p.is_symlink():
                what = os.readlink(p)
            elif p.is_file():
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(path))] = (st.st_mode, st.st_size, st.st_nlink, what)
    return out


@contextmanager
def fast_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory on tmpfs when there is one (file creation on this CI's disk is ~300 us)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        remove_tree(path)
