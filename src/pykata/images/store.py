"""Resolve an image reference to a root filesystem and its configuration.

References, in the order they are tried:
  * `busybox` (or `busybox:latest`): the embedded default image, built from Debian's busybox-static;
  * a directory with `config.json` and `rootfs/`: an OCI runtime bundle, used in place;
  * a directory with `oci-layout`: an OCI image layout;
  * a file ending in .tar (or .tar.gz): `docker save` output or an OCI archive.

Images are untrusted. An OCI image is read from index.json down: the manifest, the config and every
layer are checked against the digest and size of the descriptor naming them while they are read, and
each layer's uncompressed content against the config's rootfs.diff_ids; a `docker save` image (whose
manifest.json has no digests) is keyed by the sha256 of its config and its layers checked against that
config's diff_ids. Unpacked images are cached under <cache_dir>/images/ (0700) by those verified
digests, staged in a temporary directory (removed on any error) and renamed into place, so a layout that
claims another image's digest cannot put anything under that digest. Layers are applied by
`pykata.images.layers` within the `[image]` caps of configuration.toml.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import posixpath
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.config.schema import ImageSection
from pykata.errors import InvalidArgument
from pykata.images.blobs import (
    Budget,
    Readable,
    VerifyingReader,
    check_digest,
    open_blob_file,
    read_small,
)
from pykata.images.errors import BlobError, ImageError, ImageLimitError
from pykata.images.layers import apply_layer, remove_tree
from pykata.images.specshape import check_spec_shape
from pykata.images.tarheaders import checked_tarinfo

MAX_JSON = 4 << 20  # manifests and configs are small; anything bigger is refused
# An image's Entrypoint, Cmd and Env become the container's process, which the guest agent takes with
# at most 4096 args and env entries of at most 128 KiB each, in a spec of at most 1 MiB: an image
# over these fails when its image is read, naming the field, not in the guest after a VM booted.
MAX_PROCESS_ITEMS = 4096
MAX_PROCESS_STRING = 128 << 10
MAX_PROCESS_BYTES = 512 << 10
STALE_STAGING_SECONDS = 6 * 3600
# An archive's own symlinks (`docker save` links identical layers) are followed this many times at most.
MAX_ARCHIVE_LINKS = 8
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config that decide how its process runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    working_dir: str = "/"
    user: str = ""

    @classmethod
    def from_oci(cls, cfg: Any) -> ImageConfig:
        """Raises ImageError naming the field if a value has the wrong type."""
        if not isinstance(cfg, dict):
            raise ImageError("", "the image config is not a JSON object")
        c = cfg.get("config") or cfg.get("Config") or {}
        if not isinstance(c, dict):
            raise ImageError("", "the image config's 'config' is not a JSON object")
        entrypoint = _strings(c.get("Entrypoint"), "config.Entrypoint")
        cmd = _strings(c.get("Cmd"), "config.Cmd")
        env = _strings(c.get("Env"), "config.Env")
        for i, item in enumerate(env):
            if not item.partition("=")[0] or "=" not in item:
                raise ImageError("", f"the image config's config.Env[{i}] {item[:80]!r} is not KEY=value")
        total = sum(len(v.encode()) for v in (*entrypoint, *cmd, *env))
        if total > MAX_PROCESS_BYTES:
            raise ImageError("", f"the image config's config.Entrypoint, Cmd and Env hold {total} bytes, "
                                 f"over {MAX_PROCESS_BYTES} (the guest refuses such a process)")
        working_dir = _string(c.get("WorkingDir"), "config.WorkingDir") or "/"
        if not working_dir.startswith("/"):
            # docker refuses a relative working directory too
            raise ImageError("", f"the image config's config.WorkingDir {working_dir[:80]!r} is not an absolute path")
        return cls(entrypoint=entrypoint, cmd=cmd, env=env or cls.env,
                   # docker's filepath.Clean: "/../etc" is /etc (the guest refuses '..' in a cwd)
                   working_dir=posixpath.normpath(working_dir),
                   user=_string(c.get("User"), "config.User"))


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        raise ImageError("", f"the image config's {key} is not a list of strings")
    if len(value) > MAX_PROCESS_ITEMS:
        raise ImageError("", f"the image config's {key} has {len(value)} entries, over {MAX_PROCESS_ITEMS}")
    for i, v in enumerate(value):
        if len(v.encode()) > MAX_PROCESS_STRING:
            raise ImageError("", f"the image config's {key}[{i}] is over {MAX_PROCESS_STRING} bytes")
    return tuple(value)


def _string(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or "\0" in value:
        raise ImageError("", f"the image config's {key} is not a string")
    return value


@dataclass(frozen=True)
class Image:
    """A resolved image: a read-only root filesystem and how to run it."""

    ref: str
    rootfs: Path
    config: ImageConfig = field(default_factory=ImageConfig)
    # an OCI bundle's own config.json, when the reference was a bundle
    bundle_spec: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Layer:
    path: str  # inside the layout or archive
    digest: str | None  # the blob's (compressed) digest and size, from an OCI manifest
    size: int | None
    diff_id: str  # sha256 of the uncompressed tar, from the image config


@dataclass(frozen=True)
class _Plan:
    key: str  # the cache directory's name: a verified digest
    config: dict[str, Any]
    layers: list[_Layer]


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ImageError("", f"{what} is not valid JSON: {str(e)[:200]}") from None


def _field(obj: Any, key: str, kind: type, what: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ImageError("", f"{what}: {key!r} is missing or not a {kind.__name__}")
    return value


class _Blobs:
    """Files of an OCI layout directory or of an image archive (read without following symlinks)."""

    def __init__(self, root: Path | None = None, tar: tarfile.TarFile | None = None,
                 max_entries: int = 100_000) -> None:
        self.root_fd: int | None = None
        self.tar = tar
        self.members: dict[str, tarfile.TarInfo] = {}
        if root is not None:
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if tar is not None:
            while (m := tar.next()) is not None:
                if len(self.members) >= max_entries:
                    raise ImageLimitError("image.max_entries", max_entries, "the archive has more entries")
                self.members[posixpath.normpath("/" + m.name).lstrip("/")] = m

    def close(self) -> None:
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None

    def open(self, name: str) -> Readable:
        """Raises BlobError if `name` is missing, ImageError if it is not a plain file inside."""
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\0" in name:
            raise ImageError("", f"path {name[:200]!r} is not a plain relative path inside the image")
        if self.root_fd is not None:
            return open_blob_file(self.root_fd, parts, name)
        assert self.tar is not None
        member = self._member(name)
        f = self.tar.extractfile(member)
        assert f is not None
        return _ArchiveMember(f, name)

    def _member(self, name: str) -> tarfile.TarInfo:
        for _ in range(MAX_ARCHIVE_LINKS + 1):
            m = self.members.get(name)
            if m is None:
                raise BlobError(name, "missing from the archive")
            if m.isreg():
                return m
            if not (m.issym() or m.islnk()):
                raise ImageError("", f"{name}: not a regular file in the archive")
            base = posixpath.dirname(name) if m.issym() else ""
            target = posixpath.normpath(posixpath.join(base, m.linkname))
            if target.startswith(("/", "../")) or target == "..":
                raise ImageError("", f"{name}: a link out of the archive ({m.linkname[:200]!r})")
            name = target
        raise ImageError("", f"{name}: more than {MAX_ARCHIVE_LINKS} links in a row in the archive")

    def read_file(self, name: str, what: str) -> bytes:
        with contextlib.closing(self.open(name)) as f:  # type: ignore[type-var]
            return read_small(f, MAX_JSON, what)

    def read_blob(self, desc: Any, what: str) -> tuple[bytes, str]:
        """The content of the blob a descriptor names, checked against its digest and size."""
        digest = _field(desc, "digest", str, what)
        size = _field(desc, "size", int, what)
        algo, hexd = check_digest(digest)
        if not 0 <= size <= MAX_JSON:
            raise ImageError("", f"{what} {digest}: a size of {size} bytes is refused (at most {MAX_JSON})")
        with contextlib.closing(self.open(f"blobs/{algo}/{hexd}")) as f:  # type: ignore[type-var]
            reader = VerifyingReader(f, digest, size)
            data = read_small(reader, MAX_JSON, what)
            reader.finish()
        return data, digest


# What reading a (compressed, maybe truncated) archive raises besides tarfile.TarError.
_ARCHIVE_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


class _ArchiveMember:
    """A file inside an image archive; read errors (a truncated .tar.gz) become ImageErrors."""

    def __init__(self, f: Any, name: str) -> None:
        self._f, self._name = f, name

    def read(self, n: int = -1, /) -> bytes:
        try:
            data: bytes = self._f.read(n)
        except _ARCHIVE_READ_ERRORS as e:
            raise ImageError("", f"{self._name}: cannot be read from the archive: {e}") from None
        return data

    def close(self) -> None:
        self._f.close()


def _plan(blobs: _Blobs) -> _Plan:
    """What to unpack: from index.json (OCI) or manifest.json (docker save)."""
    try:
        index_bytes = blobs.read_file("index.json", "index.json")
    except BlobError:
        return _docker_plan(blobs)
    index = _parse_json(index_bytes, "index.json")
    manifests = _field(index, "manifests", list, "index.json")
    if not manifests:
        raise ImageError("", "index.json lists no manifests")
    data, digest = blobs.read_blob(manifests[0], "manifest")
    manifest = _parse_json(data, f"manifest {digest}")
    if isinstance(manifest, dict) and (manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest):
        # a nested index (multi-platform): take the linux/amd64 one
        entries = _field(manifest, "manifests", list, f"index {digest}")
        chosen = next((m for m in entries if isinstance(m, dict) and isinstance(m.get("platform"), dict | None)
                       and (m.get("platform") or {}).get("architecture") in ("amd64", None)), None)
        if chosen is None:
            raise ImageError("", f"index {digest} has no linux/amd64 manifest")
        data, digest = blobs.read_blob(chosen, "manifest")
        manifest = _parse_json(data, f"manifest {digest}")
    config_bytes, config_digest = blobs.read_blob(_field(manifest, "config", dict, f"manifest {digest}"),
                                                  "image config")
    config = _parse_json(config_bytes, f"image config {config_digest}")
    descs = manifest.get("layers") or [] if isinstance(manifest, dict) else []
    if not isinstance(descs, list):
        raise ImageError("", f"manifest {digest}: 'layers' is not a list")
    diff_ids = _diff_ids(config, len(descs), f"image config {config_digest}")
    layers = []
    for i, desc in enumerate(descs):
        layer_digest = _field(desc, "digest", str, f"manifest {digest} layer {i + 1}")
        size = _field(desc, "size", int, f"manifest {digest} layer {i + 1}")
        algo, hexd = check_digest(layer_digest)
        if size < 0:
            raise ImageError("", f"manifest {digest} layer {i + 1}: negative size")
        layers.append(_Layer(f"blobs/{algo}/{hexd}", layer_digest, size, diff_ids[i]))
    return _Plan("oci-" + digest.replace(":", "-"), config, layers)


def _docker_plan(blobs: _Blobs) -> _Plan:
    # docker save: manifest.json = [{"Config": "<hex>.json", "Layers": ["<id>/layer.tar", ...]}]
    manifest = _parse_json(blobs.read_file("manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError("", "neither index.json nor a manifest.json with a non-empty list")
    entry = manifest[0]
    config_bytes = blobs.read_file(_field(entry, "Config", str, "manifest.json"), "image config")
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = _parse_json(config_bytes, f"image config {config_digest}")
    paths = entry.get("Layers") or []
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ImageError("", "manifest.json: 'Layers' is not a list of paths")
    diff_ids = _diff_ids(config, len(paths), f"image config {config_digest}")
    layers = [_Layer(p, None, None, d) for p, d in zip(paths, diff_ids, strict=True)]
    return _Plan("docker-" + config_digest.replace(":", "-"), config, layers)


def _diff_ids(config: Any, count: int, what: str) -> list[str]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != count:
        raise ImageError("", f"{what}: rootfs.diff_ids must list one digest per layer ({count})")
    for d in diff_ids:
        if check_digest(d)[0] != "sha256":
            raise ImageError("", f"{what}: diff_id {d} is not a sha256 digest")
    return diff_ids


# Images made on the host rather than read from a file (name -> maker of it under images_dir): the
# embedded ones register themselves (pykata.images.builtin, imported by the package).
BUILTIN_IMAGES: dict[str, Callable[[Path], Image]] = {}


def register_builtin(name: str, make: Callable[[Path], Image]) -> None:
    """Make `name` (and `name:latest`) resolve to the image `make(images_dir)` returns."""
    BUILTIN_IMAGES[name] = make


class ImageStore:
    """Finds and unpacks images into the cache."""

    def __init__(self, cache_dir: Path, limits: ImageSection | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.images_dir = self.cache_dir / "images"
        self.limits = limits or ImageSection()

    def resolve(self, ref: str) -> Image:
        """Resolve `ref` (see the module docstring).

        Raises:
            ImageError: naming the reference (and the blob or layer): unknown, invalid, not matching
                its digests (BlobError), over a cap (ImageLimitError), or with an unsafe entry
                (LayerError).
        """
        name = ref.removesuffix(":latest")
        if name in BUILTIN_IMAGES:
            self._make_images_dir()
            return BUILTIN_IMAGES[name](self.images_dir)
        path = Path(ref)
        try:
            if path.is_dir() and (path / "config.json").is_file():
                return self._bundle(ref, path)
            if path.is_dir() and (path / "oci-layout").is_file():
                blobs = _Blobs(root=path)
                try:
                    return self._unpack(ref, blobs)
                finally:
                    blobs.close()
            if path.is_file():
                return self._archive(ref, path)
        except ImageError as e:
            if e.ref:
                raise
            raise e.locate(ref) from None
        raise ImageError(ref, "unknown image: not a built-in image (busybox), an OCI bundle or layout "
                              "directory, or an image tarball")

    def _archive(self, ref: str, path: Path) -> Image:
        try:
            tar = tarfile.open(path, tarinfo=checked_tarinfo(self.limits))  # noqa: SIM115 - closed by the with below
        except tarfile.ReadError:  # its message lists each compression tried, one line each
            raise ImageError(ref, "not an image archive: not a tar file (plain, gzip, bzip2 or xz)") from None
        except _ARCHIVE_READ_ERRORS as e:
            raise ImageError(ref, f"not an image archive: {e}") from None
        with tar:
            try:
                blobs = _Blobs(tar=tar, max_entries=self.limits.max_entries)
            except _ARCHIVE_READ_ERRORS as e:
                raise ImageError(ref, f"not an image archive: {e}") from None
            return self._unpack(ref, blobs)

    def _bundle(self, ref: str, path: Path) -> Image:
        with open(path / "config.json", "rb") as f:
            spec = _parse_json(read_small(f, MAX_JSON, "config.json"), "config.json")
        if not isinstance(spec, dict):
            raise ImageError(ref, "config.json is not a JSON object")
        try:
            check_spec_shape(spec)
        except InvalidArgument as e:
            raise ImageError(ref, str(e)) from None
        root = (spec.get("root") or {}).get("path") or "rootfs"
        rootfs = (path / root).resolve()
        if not rootfs.is_dir():
            raise ImageError(ref, f"bundle root {root!r} is not a directory")
        proc = spec.get("process") or {}
        cfg = ImageConfig(cmd=tuple(proc.get("args") or ()), env=tuple(proc.get("env") or ()),
                          working_dir=proc.get("cwd") or "/")
        return Image(ref, rootfs, cfg, bundle_spec=spec)

    def _make_images_dir(self) -> None:
        # 0700: unpacked images keep their setuid files and owners, which host users must not reach
        self.images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.images_dir, 0o700)
        # what a killed unpack left (no unpack takes hours; a live one may be running in parallel)
        now = time.time()
        for stale in self.images_dir.glob(".staging-*"):
            with contextlib.suppress(OSError):
                if now - stale.lstat().st_mtime > STALE_STAGING_SECONDS:
                    remove_tree(stale)

    def _unpack(self, ref: str, blobs: _Blobs) -> Image:
        plan = _plan(blobs)
        cfg = ImageConfig.from_oci(plan.config)
        dest = self.images_dir / plan.key
        if (dest / "rootfs").is_dir():
            return Image(ref, dest / "rootfs", cfg)
        if len(plan.layers) > self.limits.max_layers:
            raise ImageLimitError("image.max_layers", self.limits.max_layers,
                                  f"{len(plan.layers)} layers").locate(ref)
        self._make_images_dir()
        budget = Budget(self.limits)
        with _staging(self.images_dir) as tmp:
            rootfs = tmp / "rootfs"
            rootfs.mkdir(mode=0o755)
            for i, layer in enumerate(plan.layers):
                where = f"layer {i + 1}/{len(plan.layers)} ({layer.digest or layer.path})"
                try:
                    with contextlib.closing(blobs.open(layer.path)) as raw:  # type: ignore[type-var]
                        if layer.digest is None:
                            apply_layer(raw, rootfs, self.limits, budget=budget, diff_id=layer.diff_id)
                        else:
                            reader = VerifyingReader(raw, layer.digest, layer.size)
                            apply_layer(reader, rootfs, self.limits, budget=budget, diff_id=layer.diff_id)
                            reader.finish()
                except ImageError as e:
                    raise e.locate(ref, where) from None
            (tmp / "config.json").write_text(json.dumps(plan.config))
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / "rootfs").is_dir():  # lost a race to another process: theirs is good
                    raise
        return Image(ref, dest / "rootfs", cfg)


@contextlib.contextmanager
def _staging(parent: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            remove_tree(tmp)
