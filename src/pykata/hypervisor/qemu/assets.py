"""The kernel, initrd and image a VM boots: explicit ones, else configured, else `pykata image build`'s cache."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import struct
import subprocess
from collections.abc import Collection
from pathlib import Path

from pykata.config.schema import Config
from pykata.errors import HypervisorError

log = logging.getLogger("pykata.hypervisor")
# Beside the cached kernel: the same ELF without its symbol table (see without_symbols).
NOSYMS_SUFFIX = ".nosyms"
# Under runtime.cache_path: the copies without symbols of configured kernels (hypervisor.qemu.kernel).
CONFIGURED_NOSYMS_DIR = "kernel-nosyms"
SHT_SYMTAB = 2


def resolve_assets(config: Config, kernel: Path | None, initrd: Path | None,
                   image: Path | None) -> tuple[Path, Path | None, Path | None]:
    """The kernel, initrd and image a VM boots: explicit ones, else configured, else pykata.guestimage's cache.

    Raises:
        HypervisorError: no kernel or root filesystem is configured or built, or a file does not exist.
    """
    kernel = kernel or resolve_kernel(config)
    if initrd is None and image is None:
        initrd, image = resolve_rootfs(config)
    for what, path in (("kernel", kernel), ("initrd", initrd), ("image", image)):
        if path is not None and not path.is_file():
            raise HypervisorError(f"hypervisor.qemu.{what}: {path} does not exist")
    return kernel, initrd, image


def resolve_kernel(config: Config) -> Path:
    """The configured kernel, else the one `pykata image build` cached.

    Raises:
        HypervisorError: neither exists.
    """
    q = config.qemu
    if q.kernel:
        configured = Path(q.kernel)
        if not configured.is_file():
            raise HypervisorError(f"hypervisor.qemu.kernel: {q.kernel} does not exist")
        return configured_without_symbols(configured, config.runtime.cache_path / CONFIGURED_NOSYMS_DIR)
    # Lazy: the builder modules cost tens of milliseconds to import, which every shim start would pay;
    # they are needed only when no kernel is configured.
    from pykata.guestimage.kernel import find_kernel

    found = find_kernel(config.runtime.cache_path)
    if found is None:
        raise HypervisorError("no guest kernel: run `pykata image build` or set hypervisor.qemu.kernel")
    return without_symbols(Path(found.vmlinux))


def without_symbols(vmlinux: Path) -> Path:
    """The cached kernel as QEMU is given it: a copy without its symbol table, made once beside it.

    QEMU reads an ELF kernel's symbol table and sorts it at every start, for its own debug logs only
    (48,000 symbols: ~8 of the ~38 ms of CPU a QEMU takes to start, which every template clone pays on
    its way to a ready agent). The copy (`objcopy --strip-all`) has the same loadable segments and
    notes (the PVH entry), so the guest is the same; the cache keeps `vmlinux` whole for debugging.
    Never raises: without objcopy or a writable cache, `vmlinux` itself.
    """
    stripped = vmlinux.with_name(vmlinux.name + NOSYMS_SUFFIX)
    try:
        if stripped.stat().st_mtime_ns >= vmlinux.stat().st_mtime_ns:
            return stripped
    except OSError:
        pass
    return _strip(vmlinux, stripped)


def configured_without_symbols(kernel: Path, cache_dir: Path) -> Path:
    """A configured kernel as QEMU is given it: itself when it has no symbol table (a bzImage, or a
    kernel already stripped, as the node payload's), else a copy without it in `cache_dir`.

    The admin's file is never written beside: its directory may be read-only (/opt/pykata/share). The
    copy is named by the kernel's path and its identity (device, inode, size, mtime), so a kernel
    replaced in place, even by an older file, gets a new copy; the copies of its earlier versions go.
    Never raises: when no copy can be made, `kernel` itself.
    """
    stripped = configured_copy_path(kernel, cache_dir)
    if stripped is None:
        return kernel
    if stripped.is_file():
        return stripped
    by_path = stripped.name.partition("-")[0]
    if not has_symbol_table(kernel):
        return kernel
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("kernel %s: no copy without symbols (%s): QEMU loads them at each start", kernel, exc)
        return kernel
    made = _strip(kernel, stripped)
    if made == stripped:
        for old in cache_dir.glob(f"{by_path}-*{NOSYMS_SUFFIX}"):
            if old != stripped:
                old.unlink(missing_ok=True)
    return made


def configured_copy_path(kernel: Path, cache_dir: Path) -> Path | None:
    """Where configured_without_symbols keeps `kernel`'s copy in `cache_dir`, made or not: named by a
    hash of its path and one of its identity (device, inode, size, mtime). None when it cannot be
    stat'ed. Never raises."""
    try:
        st = kernel.stat()
    except OSError:
        return None
    by_path = hashlib.sha256(os.fsencode(kernel.absolute())).hexdigest()[:16]
    version = hashlib.sha256(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / f"{by_path}-{version}{NOSYMS_SUFFIX}"


def prune_configured_copies(cache_dir: Path, keep: Collection[Path], dry_run: bool = False) -> list[Path]:
    """Remove the copies without symbols in `cache_dir` (<cache_dir>/kernel-nosyms) but those in `keep`
    (the configured kernel's current copy, the kernels templates were made from) and those a process
    names on its command line or holds open (a QEMU's -kernel); return them (`dry_run`: what would go).
    A copy being made (a hidden temporary name) is never touched. Never raises."""
    try:
        copies = sorted(p for p in cache_dir.iterdir() if p.name.endswith(NOSYMS_SUFFIX)
                        and not p.name.startswith(".") and p.is_file())
    except OSError:
        return []
    spared = {str(p) for p in keep} | {os.path.realpath(p) for p in keep}
    candidates = [p for p in copies if str(p) not in spared and os.path.realpath(p) not in spared]
    used = _named_by_processes({str(p) for p in candidates} | {os.path.realpath(p) for p in candidates})
    removed = []
    for p in candidates:
        if str(p) in used or os.path.realpath(p) in used:
            continue
        if not dry_run:
            try:
                p.unlink()
            except OSError as exc:
                log.info("kernel copy %s: not removed: %s", p, exc)
                continue
        removed.append(p)
    return removed


def _named_by_processes(paths: set[str]) -> set[str]:
    """Those of `paths` some process names on its command line (as an argument or a `file=`-style
    value) or holds open. Reads /proc; a process it may not look at is skipped. Never raises."""
    found: set[str] = set()
    try:
        pids = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return found
    for pid in pids:
        with contextlib.suppress(OSError):
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                for part in os.fsdecode(arg).split(","):
                    value = part.partition("=")[2] if "=" in part else part
                    if value in paths:
                        found.add(value)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target in paths:
                        found.add(target)
    return found


def has_symbol_table(path: Path) -> bool:
    """Whether `path` is a 64-bit little-endian ELF file with a symbol table section. Never raises."""
    try:
        with path.open("rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return False
            (shoff,) = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
            if shentsize < 8 or not 0 < shnum <= 65535:
                return False
            f.seek(shoff)
            table = f.read(shentsize * shnum)
    except OSError:
        return False
    return any(struct.unpack_from("<I", table, i * shentsize + 4)[0] == SHT_SYMTAB
               for i in range(len(table) // shentsize))


def _strip(vmlinux: Path, stripped: Path) -> Path:
    """`stripped`, made from `vmlinux` with `objcopy --strip-all`; `vmlinux` when that fails."""
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        return vmlinux
    tmp = stripped.with_name(f".{stripped.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        subprocess.run([objcopy, "--strip-all", str(vmlinux), str(tmp)], check=True, capture_output=True,
                       timeout=120)
        os.replace(tmp, stripped)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("kernel %s: no copy without symbols (%s): QEMU loads them at each start", vmlinux, exc)
        tmp.unlink(missing_ok=True)
        return vmlinux
    return stripped


def resolve_rootfs(config: Config) -> tuple[Path | None, Path | None]:
    """(initrd, image): the configured one, else the root filesystem `pykata image build` cached.

    Raises:
        HypervisorError: neither exists.
    """
    q = config.qemu
    for what, value in (("initrd", q.initrd), ("image", q.image)):
        if value and not Path(value).is_file():
            raise HypervisorError(f"hypervisor.qemu.{what}: {value} does not exist")
    if q.initrd or q.image:
        return (Path(q.initrd) if q.initrd else None), (Path(q.image) if q.image else None)
    from pykata.guestimage.rootfs import find_rootfs  # lazy, as in resolve_kernel

    found = find_rootfs(config.runtime.cache_path)
    if found is None:
        raise HypervisorError("no guest root filesystem: run `pykata image build` or set hypervisor.qemu.initrd")
    if found.preferred == "image" and found.image is not None:
        return None, found.image
    return found.initrd, None
