"""Resolve an image reference to a root filesystem and its configuration.

References, in the order they are tried:
  * `busybox` (or `busybox:latest`): the embedded default image, built from Debian's busybox-static;
  * a directory with `config.json` and `rootfs/`: an OCI runtime bundle, used in place;
  * a directory with `oci-layout`: an OCI image layout;
  * a file ending in .tar (or .tar.gz): `docker save` output or an OCI archive.
Unpacked images are cached under <cache_dir>/images/<digest>/ and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.errors import PykataError
from pykata.images.layers import apply_layer

MAX_JSON = 4 << 20  # manifests and configs are small; anything bigger is refused


class ImageError(PykataError):
    """An image reference cannot be resolved or its content is invalid; `ref` names it."""

    def __init__(self, ref: str, message: str) -> None:
        super().__init__(f"image {ref!r}: {message}")
        self.ref = ref


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config that decide how its process runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    working_dir: str = "/"
    user: str = ""

    @classmethod
    def from_oci(cls, cfg: dict[str, Any]) -> ImageConfig:
        c = cfg.get("config") or cfg.get("Config") or {}
        return cls(
            entrypoint=tuple(c.get("Entrypoint") or ()),
            cmd=tuple(c.get("Cmd") or ()),
            env=tuple(c.get("Env") or cls.env),
            working_dir=c.get("WorkingDir") or "/",
            user=c.get("User") or "",
        )


@dataclass(frozen=True)
class Image:
    """A resolved image: a read-only root filesystem and how to run it."""

    ref: str
    rootfs: Path
    config: ImageConfig = field(default_factory=ImageConfig)
    # an OCI bundle's own config.json, when the reference was a bundle
    bundle_spec: dict[str, Any] | None = None


def _read_json(ref: str, data: bytes, what: str) -> Any:
    if len(data) > MAX_JSON:
        raise ImageError(ref, f"{what} is larger than {MAX_JSON} bytes")
    try:
        return json.loads(data)
    except ValueError as e:
        raise ImageError(ref, f"{what} is not valid JSON: {e}") from None


class _Blobs:
    """Reads blobs from an OCI layout directory or from inside a tar archive."""

    def __init__(self, ref: str, root: Path | None = None, tar: tarfile.TarFile | None = None) -> None:
        self.ref, self.root, self.tar = ref, root, tar

    def open(self, name: str) -> Any:
        name = name.lstrip("/")
        if ".." in Path(name).parts:
            raise ImageError(self.ref, f"blob path {name!r} escapes the image")
        if self.root is not None:
            try:
                return open(self.root / name, "rb")
            except FileNotFoundError:
                raise ImageError(self.ref, f"missing {name}") from None
        assert self.tar is not None
        try:
            f = self.tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise ImageError(self.ref, f"missing {name}")
        return f

    def read(self, name: str) -> bytes:
        with contextlib.closing(self.open(name)) as f:
            data: bytes = f.read(MAX_JSON + 1)
            return data

    def blob_path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo not in ("sha256", "sha512") or not hexd.isalnum():
            raise ImageError(self.ref, f"bad digest {digest!r}")
        return f"blobs/{algo}/{hexd}"


def _layers_and_config(blobs: _Blobs) -> tuple[list[str], dict[str, Any], str]:
    """(layer paths, image config, cache key) of an OCI layout or docker-save archive."""
    ref = blobs.ref
    try:
        index = _read_json(ref, blobs.read("index.json"), "index.json")
    except ImageError:
        index = None
    if index is not None:
        manifests = index.get("manifests") or []
        if not manifests:
            raise ImageError(ref, "index.json lists no manifests")
        digest = manifests[0]["digest"]
        manifest = _read_json(ref, blobs.read(blobs.blob_path(digest)), "manifest")
        if manifest.get("manifests"):  # a nested index (multi-platform): take the amd64 one
            chosen = next((m for m in manifest["manifests"]
                           if (m.get("platform") or {}).get("architecture") in ("amd64", None)), None)
            if chosen is None:
                raise ImageError(ref, "no linux/amd64 manifest in the index")
            digest = chosen["digest"]
            manifest = _read_json(ref, blobs.read(blobs.blob_path(digest)), "manifest")
        config = _read_json(ref, blobs.read(blobs.blob_path(manifest["config"]["digest"])), "image config")
        layers = [blobs.blob_path(layer["digest"]) for layer in manifest.get("layers") or []]
        return layers, config, digest
    # docker save: manifest.json = [{"Config": "...json", "Layers": ["<id>/layer.tar", ...]}]
    manifest = _read_json(ref, blobs.read("manifest.json"), "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(ref, "manifest.json is not a non-empty list")
    entry = manifest[0]
    config_bytes = blobs.read(entry["Config"])
    config = _read_json(ref, config_bytes, "image config")
    return list(entry.get("Layers") or []), config, "sha256:" + hashlib.sha256(config_bytes).hexdigest()


class ImageStore:
    """Finds and unpacks images into the cache."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.images_dir = self.cache_dir / "images"

    def resolve(self, ref: str) -> Image:
        """Resolve `ref` (see the module docstring). Raises ImageError naming the reference."""
        from pykata.images.builtin import BUILTIN_IMAGES

        name = ref.removesuffix(":latest")
        if name in BUILTIN_IMAGES:
            return BUILTIN_IMAGES[name](self.images_dir)
        path = Path(ref)
        if path.is_dir() and (path / "config.json").is_file():
            return self._bundle(ref, path)
        if path.is_dir() and (path / "oci-layout").is_file():
            return self._unpack(ref, _Blobs(ref, root=path))
        if path.is_file():
            try:
                tar = tarfile.open(path)  # noqa: SIM115 - closed by the with below
            except tarfile.TarError as e:
                raise ImageError(ref, f"not an image archive: {e}") from None
            with tar:
                return self._unpack(ref, _Blobs(ref, tar=tar))
        raise ImageError(ref, "unknown image: not a built-in image (busybox), an OCI bundle or layout "
                              "directory, or an image tarball")

    def _bundle(self, ref: str, path: Path) -> Image:
        spec = _read_json(ref, (path / "config.json").read_bytes(), "config.json")
        root = (spec.get("root") or {}).get("path") or "rootfs"
        rootfs = (path / root).resolve()
        if not rootfs.is_dir():
            raise ImageError(ref, f"bundle root {root!r} is not a directory")
        proc = spec.get("process") or {}
        cfg = ImageConfig(cmd=tuple(proc.get("args") or ()), env=tuple(proc.get("env") or ()),
                          working_dir=proc.get("cwd") or "/")
        return Image(ref, rootfs, cfg, bundle_spec=spec)

    def _unpack(self, ref: str, blobs: _Blobs) -> Image:
        layers, config, key = _layers_and_config(blobs)
        dest = self.images_dir / key.replace(":", "-")
        cfg = ImageConfig.from_oci(config)
        if (dest / "rootfs").is_dir():
            return Image(ref, dest / "rootfs", cfg)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        with _staging(self.images_dir) as tmp:
            rootfs = tmp / "rootfs"
            rootfs.mkdir()
            for layer in layers:
                with contextlib.closing(blobs.open(layer)) as f:
                    try:
                        with tarfile.open(fileobj=f, mode="r|*") as tar:
                            apply_layer(tar, rootfs)
                    except tarfile.TarError as e:
                        raise ImageError(ref, f"layer {layer}: {e}") from None
            (tmp / "config.json").write_text(json.dumps(config))
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
        shutil.rmtree(tmp, ignore_errors=True)
