"""Images pykata carries itself, built from Debian packages on the host at setup time.

`busybox`: Debian's busybox-static with its applet links, /etc/passwd and /etc/group, and the
usual empty mount points. `pause`: the same, for pod sandboxes (its command sleeps forever).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pykata.images.errors import ImageError
from pykata.images.store import Image, ImageConfig, register_builtin

BUSYBOX = Path("/bin/busybox")
RECIPE_VERSION = "2"  # 2: etc/hosts

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
# localhost resolves as in a docker container (whose runtime writes /etc/hosts): `pykata run` and ctr give
# the container none of their own, so `wget http://localhost/` in the README's httpd example failed
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _busybox_key() -> str:
    st = os.stat(BUSYBOX)
    return f"busybox-{RECIPE_VERSION}-{st.st_size}-{int(st.st_mtime)}"


def build_busybox_rootfs(rootfs: Path) -> None:
    """Fill `rootfs` with busybox-static and its applets. Raises ImageError if busybox is missing."""
    if not BUSYBOX.is_file():
        raise ImageError("busybox", f"{BUSYBOX} not found (apt-get install busybox-static)")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run", "var"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True).stdout
    for line in applets.split():
        link = rootfs / line
        if line == "bin/busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    (rootfs / "etc/passwd").write_text(PASSWD)
    (rootfs / "etc/group").write_text(GROUP)
    (rootfs / "etc/hostname").write_text("pykata\n")
    (rootfs / "etc/hosts").write_text(HOSTS)


def _builtin(name: str, config: ImageConfig) -> Callable[[Path], Image]:
    def resolve(images_dir: Path) -> Image:
        dest = images_dir / _busybox_key()
        if not (dest / "rootfs").is_dir():
            images_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=images_dir))
            try:
                build_busybox_rootfs(tmp / "rootfs")
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not (dest / "rootfs").is_dir():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return Image(name, dest / "rootfs", config)
    return resolve


register_builtin("busybox", _builtin("busybox", ImageConfig(cmd=("sh",))))
register_builtin("pause", _builtin("pause", ImageConfig(cmd=("sleep", "2147483647"))))


class _HashingWriter:
    """A file that hashes (sha256) and counts what is written through it, for tarfile's `fileobj`."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def export_oci_archive(image: Image, out: Path, name: str = "busybox:latest") -> Path:
    """Write `image` as a single-layer OCI archive (importable with `ctr images import`).

    The layer is written once to an unnamed temporary file beside `out` while its digest is computed,
    then copied into the archive a block at a time: memory stays bounded whatever the image's size (it
    held the whole layer twice). Raises OSError."""
    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    with tempfile.TemporaryFile(dir=out.parent) as layer_file:
        hashing = _HashingWriter(layer_file)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.PAX_FORMAT) as lt:  # type: ignore[call-overload]
            for path in sorted(image.rootfs.rglob("*")):
                info = lt.gettarinfo(str(path), arcname=str(path.relative_to(image.rootfs)))
                info.mtime, info.uname, info.gname = 0, "", ""
                if info.isreg():
                    with open(path, "rb") as f:
                        lt.addfile(info, f)
                else:
                    lt.addfile(info)
        layer_digest, layer_size = "sha256:" + hashing.sha.hexdigest(), hashing.size
        c = image.config
        config = {"architecture": "amd64", "os": "linux",
                  "config": {"Env": list(c.env), "Cmd": list(c.cmd), "Entrypoint": list(c.entrypoint) or None,
                             "WorkingDir": c.working_dir},
                  "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
        config_digest, config_bytes = blob(json.dumps(config, sort_keys=True).encode())
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": config_digest, "size": len(config_bytes)},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                "digest": layer_digest, "size": layer_size}]}
        manifest_digest, manifest_bytes = blob(json.dumps(manifest, sort_keys=True).encode())
        index = {"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
             "size": len(manifest_bytes), "annotations": {"org.opencontainers.image.ref.name": name}}]}
        with tarfile.open(out, "w") as t:
            def add(arcname: str, data: bytes) -> None:
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add("index.json", json.dumps(index).encode())
            layer_info = tarfile.TarInfo(f"blobs/sha256/{layer_digest.split(':')[1]}")
            layer_info.size = layer_size
            layer_file.seek(0)
            t.addfile(layer_info, layer_file)  # copied in blocks
            for digest, data in ((config_digest, config_bytes), (manifest_digest, manifest_bytes)):
                add(f"blobs/sha256/{digest.split(':')[1]}", data)
    return out
