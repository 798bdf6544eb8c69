"""`pykata image`: build and inspect the cached guest kernel and root filesystem."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from pykata.errors import PykataError


def _cache_dir(option: Path | None) -> Path:
    if option is not None:
        return option
    from pykata.config.load import load_config

    try:
        return load_config().runtime.cache_path
    except PykataError as exc:
        raise click.ClickException(str(exc)) from None


class _Progress:
    """One line per step on stderr, with the seconds since the command started."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        click.echo(f"[pykata image {elapsed:6.1f}s] {self.what}: {message}", err=True)


def _kernel_info(art: Any) -> dict[str, Any] | None:
    if art is None:
        return None
    return {"key": art.key, "version": art.version, "vmlinux": str(art.vmlinux),
            "bzimage": str(art.bzimage) if art.bzimage else None}


def _rootfs_info(art: Any) -> dict[str, Any] | None:
    if art is None:
        return None
    m = art.manifest
    return {
        "key": art.key,
        "initrd": str(art.initrd),
        "initrd_size": m.get("initrd", {}).get("size"),
        "image": str(art.image) if art.image else None,
        "image_size": (m.get("image") or {}).get("size"),
        "preferred": art.preferred,
        "kernel_params": {"initrd": art.kernel_params("initrd"),
                          "image": art.kernel_params("image") if art.image else None},
        "packages": {p["name"]: p["version"] for p in m.get("inputs", {}).get("packages", [])},
    }


SHOWN_OTHERS = 5


def _print_human(data: dict[str, Any]) -> None:
    kernel, rootfs = data["kernel"], data["rootfs"]
    click.echo(f"cache:   {data['cache_dir']}")
    if kernel:
        click.echo(f"kernel:  {kernel['vmlinux']}  ({kernel['version']}, key {kernel['key']})")
    else:
        click.echo("kernel:  not built (pykata image build)")
    if rootfs:
        click.echo(f"initrd:  {rootfs['initrd']}  ({rootfs['initrd_size'] / 1e6:.1f} MB)")
        if rootfs["image"]:
            click.echo(f"image:   {rootfs['image']}  ({rootfs['image_size'] / 1e6:.1f} MB, "
                       f"kernel params: {rootfs['kernel_params']['image']})")
        click.echo(f"rootfs:  key {rootfs['key']}, preferred boot form: {rootfs['preferred']}")
    else:
        click.echo("rootfs:  not built (pykata image build)")
    for name in ("other_kernels", "other_rootfs"):
        others = data.get(name) or []
        if len(others) > SHOWN_OTHERS:  # a busy cache keeps every build of the last 12 hours: 100+ keys
            click.echo(f"{name.replace('_', ' ')} in the cache: {len(others)}: "
                       f"{', '.join(others[:SHOWN_OTHERS])}, ... (--json lists all)")
        elif others:
            click.echo(f"{name.replace('_', ' ')} in the cache: {', '.join(others)}")


@click.group("image")
def image() -> None:
    """Build and inspect the guest kernel and root filesystem (cached by a hash of their inputs)."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the cache has a build for these inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Cache directory (default: runtime.cache_dir of configuration.toml).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Parallel kernel compile jobs.")
def build(force: bool, as_json: bool, cache_dir: Path | None, jobs: int | None) -> None:
    """Build the guest kernel and root filesystem into the cache and print their paths.

    The first build takes a few minutes (the kernel) and shows progress on stderr; later runs
    return the cached artifacts at once.
    """
    from pykata.guestimage.kernel import build_kernel
    from pykata.guestimage.rootfs import build_rootfs

    cache = _cache_dir(cache_dir)
    try:
        kernel = build_kernel(cache, jobs=jobs, progress=_Progress("kernel"), force=force)
        rootfs = build_rootfs(cache, progress=_Progress("rootfs"), force=force, referenced=_template_files())
    except PykataError as exc:
        raise click.ClickException(str(exc)) from None
    data = {"cache_dir": str(cache), "kernel": _kernel_info(kernel), "rootfs": _rootfs_info(rootfs)}
    if as_json:
        json.dump(data, sys.stdout, indent=2)
        click.echo()
    else:
        _print_human(data)


def _config() -> Any:
    """The configuration, None when it cannot be read."""
    from pykata.config.load import load_config

    try:
        return load_config()
    except PykataError:
        return None


def _template_files(kernels: bool = False) -> list[Path]:
    """The initrd/image files (`kernels`: the kernel files) the configured templates were made from: a
    prune spares them (a clone boots with its template's files). None when the configuration cannot be
    read."""
    from pykata.factory.template import list_templates

    config = _config()
    if config is None:
        return []
    templates = list_templates(config)
    return [p for t in templates for p in ((t.kernel,) if kernels else (t.initrd, t.image)) if p is not None]


def _prune_kernel_copies(cache: Path) -> list[Path]:
    """Remove the copies without symbols in <cache>/kernel-nosyms of configured kernels
    (hypervisor.qemu.kernel) but the current kernel's, those templates were made from and those a
    process uses (pykata.hypervisor.qemu.assets.prune_configured_copies). Nothing when the configuration
    cannot be read."""
    from pykata.hypervisor.qemu.assets import CONFIGURED_NOSYMS_DIR, configured_copy_path, prune_configured_copies

    config = _config()
    if config is None:
        return []
    copies = cache / CONFIGURED_NOSYMS_DIR
    keep = _template_files(kernels=True)
    if config.qemu.kernel:
        current = configured_copy_path(Path(config.qemu.kernel), copies)
        if current is not None:
            keep.append(current)
    return prune_configured_copies(copies, keep)


@image.command("prune")
@click.option("--keep", type=click.IntRange(min=1), default=4, show_default=True,
              help="Root filesystem builds to keep, newest first (the current one counts).")
@click.option("--max-size", default="3g", show_default=True,
              help="Keep at most this much in all (e.g. 2g, 500m); the oldest go first.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Cache directory (default: runtime.cache_dir of configuration.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print the removed builds as JSON.")
def prune(keep: int, max_size: str, cache_dir: Path | None, as_json: bool) -> None:
    """Remove old guest root filesystem builds from the cache (each agent change makes one of ~70 MB), whatever
    their age, beyond --keep and --max-size. Never the current build nor one in use (a running VM's, a
    template's). `pykata image build` prunes too, sparing builds younger than 12 hours up to 32 builds / 3 GiB.
    Also removes the copies without symbols of configured kernels (<cache>/kernel-nosyms) but the current
    kernel's and those a template or a running VM uses."""
    from pykata.guestimage.rootfs import builds_in_use, list_rootfs, prune_rootfs
    from pykata.sandbox.ocispec import parse_size

    try:
        limit = parse_size(max_size, "--max-size")
    except PykataError as exc:
        raise click.UsageError(str(exc)) from None
    cache = _cache_dir(cache_dir)
    try:
        current = (cache / "rootfs" / "current").read_text().strip()
    except OSError:
        current = ""
    before = {a.key for a in list_rootfs(cache)}
    removed = prune_rootfs(cache, keep=keep, current=current, max_bytes=limit,
                           in_use=builds_in_use(cache, _template_files()))
    copies = _prune_kernel_copies(cache)
    if as_json:
        json.dump({"cache_dir": str(cache), "removed": removed, "kept": sorted(before - set(removed)),
                   "removed_kernel_copies": [str(p) for p in copies]}, sys.stdout, indent=2)
        click.echo()
        return
    for key in removed:
        click.echo(f"removed rootfs build {key}")
    for path in copies:
        click.echo(f"removed kernel copy {path}")
    click.echo(f"{len(removed)} removed, {len(before) - len(removed)} kept in {cache / 'rootfs'}")


@image.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Cache directory (default: runtime.cache_dir of configuration.toml).")
def info(as_json: bool, cache_dir: Path | None) -> None:
    """Show the cached kernel and root filesystem for the current inputs (never builds)."""
    from pykata.guestimage.kernel import find_kernel
    from pykata.guestimage.rootfs import find_rootfs, list_rootfs

    cache = _cache_dir(cache_dir)
    kernel = find_kernel(cache)
    rootfs = find_rootfs(cache)
    kernel_dir = cache / "kernel"
    kernels = sorted(p.name for p in kernel_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if kernel_dir.is_dir() else []
    data = {
        "cache_dir": str(cache),
        "kernel": _kernel_info(kernel),
        "rootfs": _rootfs_info(rootfs),
        "other_kernels": [k for k in kernels if kernel is None or k != kernel.key],
        "other_rootfs": [a.key for a in list_rootfs(cache) if rootfs is None or a.key != rootfs.key],
    }
    if as_json:
        json.dump(data, sys.stdout, indent=2)
        click.echo()
    else:
        _print_human(data)


@image.command("save")
@click.argument("image_ref", metavar="IMAGE")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The OCI archive to write (replaced whole when complete).")
@click.option("--name", default="docker.io/library/busybox:latest", show_default=True,
              help="The reference the archive names (its index's org.opencontainers.image.ref.name).")
def save(image_ref: str, output: Path, name: str) -> None:
    """Write a container IMAGE (the embedded `busybox`, or any image `pykata run` takes) as a one-layer OCI
    archive for `ctr images import`, so containerd can run it without a registry."""
    import os
    import tempfile

    from pykata.config.load import load_config
    from pykata.images import ImageStore
    from pykata.images.builtin import export_oci_archive

    if not name or any(c.isspace() for c in name):
        raise click.BadParameter(f"{name!r} is not an image reference", param_hint="--name")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise click.BadParameter(f"directory {parent} does not exist", param_hint="--output")
    try:
        config = load_config()
        image = ImageStore(config.runtime.cache_path, config.image).resolve(image_ref)
    except PykataError as exc:
        raise click.ClickException(str(exc)) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=parent)
    os.close(fd)
    try:
        export_oci_archive(image, Path(tmp), name)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    click.echo(f"{output}: {name} (import: ctr images import --base-name {name.rsplit(':', 1)[0]} {output})")
