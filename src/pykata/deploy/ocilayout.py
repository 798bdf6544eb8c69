"""Write an OCI image layout (image-spec 1.1) from directory trees, without a container engine.

Each layer is an uncompressed tar of one directory tree (owners root, every mtime `epoch`, entries
sorted), so the same tree gives the same digest; its diff_id is then its digest. A layer already in
`blobs/` under a cache key is reused without reading its tree again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pykata.errors import PykataError
from pykata.fsutil import atomic_write

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


class OciLayoutError(PykataError):
    """The layout cannot be written or is not valid; the message names the blob or file."""


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int

    def descriptor(self, media_type: str, **annotations: str) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": media_type, "digest": self.digest, "size": self.size}
        if annotations:
            d["annotations"] = annotations
        return d


@dataclass(frozen=True)
class LayerSource:
    """A tree to put at `dest` (an absolute path in the image), cached under `key`."""

    tree: Path
    dest: str
    key: str
    comment: str


class _HashingWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.f.write(data)


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


def _write_blob(layout: Path, data: bytes) -> Blob:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    if not path.exists():
        atomic_write(path, data)
    return Blob(digest, len(data))


def _parents(dest: str) -> list[str]:
    parts = Path(dest).relative_to("/").parts
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _add_tree(tar: tarfile.TarFile, tree: Path, dest: str, epoch: int) -> None:
    def norm(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = epoch
        return info

    for parent in _parents(dest):
        info = tarfile.TarInfo(parent)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(norm(info))
    base = dest.lstrip("/")
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        rel = os.path.relpath(dirpath, tree)
        here = base if rel == "." else f"{base}/{rel}" if base else rel
        if here:
            tar.addfile(norm(tar.gettarinfo(dirpath, here)))
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            path = os.path.join(dirpath, name)
            info = norm(tar.gettarinfo(path, f"{here}/{name}" if here else name))
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif info.issym() or info.islnk() or info.isdir():
                tar.addfile(info)
            else:
                raise OciLayoutError(f"{path}: {stat.filemode(os.lstat(path).st_mode)} is not a file, "
                                     "directory or link; not put in an image")
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


def memo_dir(layout: Path) -> Path:
    """Where the layers' cache records live: beside the layout, which holds only what the spec names."""
    return layout.with_name(layout.name + ".layers")


def write_layer(layout: Path, source: LayerSource, epoch: int) -> Blob:
    """The layer for `source`: from the cache when its key was written before. Raises OciLayoutError."""
    memo = memo_dir(layout) / f"{source.key}.json"
    try:
        saved = json.loads(memo.read_text())
        blob = Blob(saved["digest"], saved["size"])
        if blob_path(layout, blob.digest).stat().st_size == blob.size:
            return blob
    except (OSError, ValueError, KeyError, TypeError):
        pass
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=layout / "blobs/sha256", prefix=".layer-")
    try:
        with os.fdopen(fd, "wb") as f:
            w = _HashingWriter(f)
            with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                _add_tree(tar, source.tree, source.dest, epoch)
        blob = Blob("sha256:" + w.h.hexdigest(), w.size)
        os.replace(tmp, blob_path(layout, blob.digest))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write(memo, json.dumps({"digest": blob.digest, "size": blob.size}))
    return blob


def write_image(layout: Path, layers: Sequence[LayerSource], image_config: dict[str, Any], ref: str,
                epoch: int) -> Blob:
    """Write the layout at `layout` with one image, tagged `ref`; returns its manifest blob.

    Raises OciLayoutError or OSError."""
    blobs = [write_layer(layout, s, epoch) for s in layers]
    created = "1970-01-01T00:00:00Z" if epoch == 0 else _rfc3339(epoch)
    config = {
        "created": created, "architecture": "amd64", "os": "linux", "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in blobs]},
        "history": [{"created": created, "created_by": s.comment} for s in layers],
    }
    config_blob = _write_blob(layout, json.dumps(config, indent=1, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                "config": config_blob.descriptor(CONFIG_TYPE),
                "layers": [b.descriptor(LAYER_TYPE) for b in blobs]}
    manifest_blob = _write_blob(layout, json.dumps(manifest, indent=1, sort_keys=True).encode())
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE,
             "manifests": [manifest_blob.descriptor(MANIFEST_TYPE, **{REF_NAME: ref})]}
    atomic_write(layout / "index.json", json.dumps(index, indent=1, sort_keys=True) + "\n")
    atomic_write(layout / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    return manifest_blob


def _rfc3339(epoch: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def verify(layout: Path) -> dict[str, Any]:
    """Check the layout: oci-layout, index, each manifest, config and layer blob (digest and size), and that
    the config's diff_ids are the (uncompressed) layers' digests. Returns the first image's config.

    Raises OciLayoutError naming what is wrong."""
    try:
        if json.loads((layout / "oci-layout").read_text()).get("imageLayoutVersion") != "1.0.0":
            raise OciLayoutError(f"{layout / 'oci-layout'}: imageLayoutVersion is not 1.0.0")
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise OciLayoutError(f"{layout}: {e}") from None

    def read(desc: dict[str, Any], media_type: str) -> bytes:
        if desc.get("mediaType") != media_type:
            raise OciLayoutError(f"{desc.get('digest')}: mediaType {desc.get('mediaType')!r}, not {media_type!r}")
        path = blob_path(layout, str(desc["digest"]))
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OciLayoutError(f"{path}: {e.strerror}") from None
        if len(data) != desc["size"] or "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
            raise OciLayoutError(f"{path}: content does not match its descriptor (digest {desc['digest']}, "
                                 f"size {desc['size']}, read {len(data)} bytes)")
        return data

    if not index.get("manifests"):
        raise OciLayoutError(f"{layout / 'index.json'}: no manifests")
    first: dict[str, Any] | None = None
    for mdesc in index["manifests"]:
        manifest = json.loads(read(mdesc, MANIFEST_TYPE))
        config = json.loads(read(manifest["config"], CONFIG_TYPE))
        layers = manifest["layers"]
        for ldesc in layers:
            read(ldesc, LAYER_TYPE)
        if config["rootfs"]["diff_ids"] != [ldesc["digest"] for ldesc in layers]:
            raise OciLayoutError(f"{mdesc['digest']}: the config's diff_ids are not its layers' digests")
        first = first or config
    assert first is not None
    return first
