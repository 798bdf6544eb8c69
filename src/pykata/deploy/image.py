"""The node installer's container image (kata-deploy's image, for pykata), built as an OCI layout.

Three layers, each cached by a key of its inputs:
  base       Debian 12's python3.11 and the libraries it and the payload's wheels load, busybox
             (sh, nsenter, sleep), unpacked from .debs with dpkg-deb -x as the guest image is
  payload    the node payload (pykata.deploy.payload) at /opt/pykata-artifacts
  installer  the `kubernetes` client (the node label) at /opt/pykata-installer, and /usr/local/bin/pykata

The image runs `pykata install node` from the payload's own venv, so what it installs is what it runs.
No registry, no container engine: the layout is written by pykata.deploy.ocilayout, and
`ctr images import` (or skopeo/umoci) takes it from there.

    python -m pykata.deploy.image OUTPUT_DIR [--ref pykata-deploy:latest]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pykata.deploy import ocilayout, payload
from pykata.errors import PykataError
from pykata.guestimage import assemble, debs

ARTIFACTS = "/opt/pykata-artifacts"
INSTALLER_SITE = "/opt/pykata-installer"
EPOCH = 1704067200  # 2024-01-01: every file's mtime, so the same inputs give the same digests
BASE_PACKAGES = (
    "busybox-static",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libffi8", "liblzma5", "libbz2-1.0",
    "libssl3", "libuuid1", "libsqlite3-0", "libtinfo6", "libncursesw6", "libreadline8", "libcrypt1",
    "ca-certificates",
)
BASE_DROP = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "usr/share/info")
KUBERNETES_PIN = "kubernetes==37.0.2"  # the `deploy` extra of pyproject.toml


class ImageBuildError(PykataError):
    """The installer image cannot be built; the message names the step."""


def _say(msg: str) -> None:
    print(f"[deploy-image] {msg}", file=sys.stderr, flush=True)


def build_base(work: Path, cache: Path) -> tuple[Path, str]:
    packages = debs.resolve(BASE_PACKAGES, cache, _say, refresh=True)
    key = hashlib.sha256(("base 1\n" + "\n".join(f"{p.name} {p.sha256}" for p in packages)).encode()).hexdigest()[:20]
    tree = work / f"base-{key}"
    if not (tree / "usr/bin/python3.11").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        for deb in debs.fetch(packages, cache, _say):
            debs.extract(deb, tree)
        for rel in BASE_DROP:
            shutil.rmtree(tree / rel, ignore_errors=True)
        assemble.busybox_links(tree)
        for d in ("tmp", "proc", "sys", "dev", "host", "etc"):
            (tree / d).mkdir(exist_ok=True)
        (tree / "tmp").chmod(0o1777)
    return tree, key


def build_installer(work: Path) -> tuple[Path, str]:
    key = hashlib.sha256(f"installer 1 {KUBERNETES_PIN} {payload.PYTHON}".encode()).hexdigest()[:20]
    tree = work / f"installer-{key}"
    site = tree / INSTALLER_SITE.lstrip("/")
    if not (tree / "usr/local/bin/pykata").exists():
        shutil.rmtree(tree, ignore_errors=True)
        site.mkdir(parents=True)
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site),
                            "--python-version", "3.11", "--only-binary", ":all:", "--implementation", "cp",
                            "--platform", "manylinux2014_x86_64", KUBERNETES_PIN], capture_output=True, text=True,
                           check=False)
        if p.returncode != 0:
            raise ImageBuildError(f"pip install {KUBERNETES_PIN}: {p.stderr.strip()[-800:]}")
        shutil.rmtree(site / "bin", ignore_errors=True)
        script = tree / "usr/local/bin/pykata"
        script.parent.mkdir(parents=True)
        script.write_text(payload.entry_script(Path(ARTIFACTS), "pykata.cli.main"))
        script.chmod(0o755)
    return tree, key


def image_config() -> dict[str, Any]:
    return {
        "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"PYTHONPATH={INSTALLER_SITE}",
                f"PYKATA_PAYLOAD={ARTIFACTS}"],
        "Entrypoint": ["/usr/local/bin/pykata", "install", "node"],
        "Cmd": ["--root", "/host"],
        "Labels": {"org.opencontainers.image.title": "pykata-deploy",
                   "org.opencontainers.image.description": "installs pykata on a Kubernetes node"},
    }


def build(out: Path, ref: str = "latest", work: Path | None = None) -> dict[str, Any]:
    """Build the payload and the image layout at `out`; returns the image's config. Raises PykataError."""
    from pykata.config import load_config
    from pykata.guestimage.kernel import find_kernel
    from pykata.guestimage.rootfs import find_rootfs
    from pykata.hypervisor.qemu.assets import without_symbols

    work = work or out.parent / "work"
    cache = load_config().runtime.cache_path
    kernel, rootfs = find_kernel(cache), find_rootfs(cache)
    if kernel is None or rootfs is None:
        raise ImageBuildError("no guest kernel or root filesystem: run `pykata image build` first")
    # The kernel without its symbol table, as QEMU is given the cached one: QEMU would sort its 48,000
    # symbols at every start on the node. Only the symbols go (same segments and PVH note).
    pl = payload.build(work / "payload", without_symbols(Path(kernel.vmlinux)), rootfs.initrd, progress=_say)
    base, base_key = build_base(work, work / "debs")
    installer, installer_key = build_installer(work)
    layers = [
        ocilayout.LayerSource(base, "/", base_key, "Debian 12 python3.11 and busybox (dpkg-deb -x)"),
        ocilayout.LayerSource(pl.root, ARTIFACTS, pl.key, f"pykata payload {pl.key}"),
        ocilayout.LayerSource(installer, "/", installer_key, f"{KUBERNETES_PIN} and /usr/local/bin/pykata"),
    ]
    manifest = ocilayout.write_image(out, layers, image_config(), ref, EPOCH)
    _prune(out, manifest)
    for stale in [*work.glob("base-*"), *work.glob("installer-*")]:
        if stale not in (base, installer):
            shutil.rmtree(stale, ignore_errors=True)  # trees of earlier inputs
    _say(f"{out}: {ref} manifest {manifest.digest}")
    return ocilayout.verify(out)


def _prune(layout: Path, manifest: ocilayout.Blob) -> None:
    """Remove blobs no longer referenced (earlier payloads), and their cache records."""
    import json

    m = json.loads(ocilayout.blob_path(layout, manifest.digest).read_bytes())
    keep = {manifest.digest, m["config"]["digest"], *(layer["digest"] for layer in m["layers"])}
    for blob in (layout / "blobs/sha256").iterdir():
        if f"sha256:{blob.name}" not in keep:
            blob.unlink()
    for memo in ocilayout.memo_dir(layout).glob("*.json"):
        if json.loads(memo.read_text()).get("digest") not in keep:
            memo.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pykata.deploy.image", description=__doc__.split("\n")[0])
    ap.add_argument("output", type=Path, help="directory for the OCI layout")
    ap.add_argument("--ref", default="latest", help="the image's ref name (tag) in index.json")
    args = ap.parse_args(argv)
    try:
        build(args.output, args.ref)
    except PykataError as e:
        print(f"pykata: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
