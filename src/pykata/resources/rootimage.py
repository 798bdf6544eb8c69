"""Container images as read-only ext4 disks for the guest (Kata's block-device rootfs), built once
per image and cached.

The guest walks an image's tree many times (every exec, import and `ls`); over 9p each lookup is a
round trip to the host. A read-only disk is cached by the guest's own page cache instead. So the image's
merged read-only tree (a `pykata run` image, a bundle's rootfs, or containerd's snapshots as the host's
read-only overlay shows them: whiteouts and opaque directories already applied) is written into an ext4
file with `mke2fs -d` (no mount on the host: the host never mounts a file system whose content came
from a pod, it only writes one), which keeps owners, modes, hard links, xattrs (security.capability),
FIFOs and sockets; a debugfs pass then sets the nanoseconds of the times (mke2fs keeps seconds only)
and the root directory's owner, mode and times. The hypervisor gives the file to the guest in a
read-only slot (pykata.hypervisor.qemu.slots).

Cache: <cache_dir>/rootimages/ (0700), one `<key>.ext4` per image, keyed by what identifies the
content without reading it: the image store's verified digest, containerd's committed snapshot
directories (immutable), or for a directory used in place (a bundle) a fingerprint of every entry's
metadata (inode, ctime, size: a change to a file changes its ctime). Least recently used images go
once the cache passes `runtime.rootfs_block_cache_mib`. A build is locked per key and renamed into
place when complete.

Every tree is scanned before it is written, within the `[image]` caps: too many entries, too many
bytes, too long a path, or a device node (refused as the image store refuses them) fail with a
RootImageError naming the image and the entry or the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pykata.config.schema import ImageSection, RuntimeConfig
from pykata.errors import PykataError
from pykata.fsutil import file_lock
from pykata.resources.mounts import RootfsMount, overlay_layers

log = logging.getLogger("pykata.rootimage")

# Bump when the way an image is written changes: it is part of every key.
FORMAT = 3
SUFFIX = ".ext4"
BLOCK = 4096
INODE_SIZE = 256
MKE2FS_TIMEOUT = 600.0
# Room for what the estimate cannot see (directory blocks of huge directories, extent blocks).
SLACK = 1.15
_BUILD_ATTEMPTS = 3
# The guest reads at most this much of an image disk ahead at mount: the file system's metadata is at
# its start (inode tables, then directories among the data), and big reads cost far less under
# emulation than one 4 KiB read per lookup.
PREFETCH_MAX = 64 << 20
_STORE_IMAGES = "images"


class RootImageError(PykataError):
    """An image could not be made into a disk; names the image and the entry or the cap."""

    def __init__(self, image: str, message: str) -> None:
        super().__init__(f"image {image}: {message}")
        self.image = image


@dataclass(frozen=True)
class RootImage:
    """A built image: `path` is the ext4 file (exactly the slot size), `root_mode` the mode of the
    image's root directory (the guest's writable layer takes it)."""

    key: str
    path: Path
    root_mode: int
    # bytes from the start of the disk that the file system uses (what the guest reads ahead at mount)
    used_bytes: int = 0
    # inodes its file system uses (files, directories, links; hard links of one file count once)
    used_inodes: int = 0

    @property
    def prefetch(self) -> int:
        """How much of the disk the guest should read ahead when it mounts it."""
        return min(self.used_bytes, PREFETCH_MAX)


@dataclass(frozen=True)
class Source:
    """Where an image's merged read-only tree is read from, and the key of its content (None: derive
    it from the tree's metadata, for a directory used in place)."""

    tree: Path
    key: str | None
    label: str


def source_for(rootfs: Path | Sequence[RootfsMount], mounted: Path, cache_dir: Path) -> Source | None:
    """The Source of a container root given as `add_rootfs` takes it: an image directory, or
    containerd's root mounts already mounted read-only (merged) at `mounted`. None when the content
    has no stable identity (a containerd root whose writable snapshot is not empty, or mounts other
    than one overlay or bind of snapshots): such a root keeps going through the shared directory."""
    if isinstance(rootfs, Path):
        store = (cache_dir / _STORE_IMAGES).resolve()
        real = rootfs.resolve()
        if real.name == "rootfs" and real.parent.parent == store:
            # the image store's directory: named by a verified digest, never changed once made
            return Source(real, f"store-{real.parent.name}", real.parent.name)
        return Source(real, None, str(rootfs))
    if len(rootfs) != 1 or rootfs[0].type not in ("overlay", "bind"):
        return None
    layers: list[str] = []
    upper = ""
    for opt in rootfs[0].options:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            layers += value.split(":")
        elif key == "upperdir":
            upper = value
    if rootfs[0].type == "bind":
        upper = rootfs[0].source
    if upper:
        try:
            if any(os.scandir(upper)):
                return None  # the container's own snapshot holds files: it can change
        except OSError:
            return None
    if not layers:
        return None
    ids = []
    for layer in layers:
        try:
            st = os.stat(layer)
        except OSError:
            return None
        # committed snapshots never change; the inode and ctime tell a reused path from the old one
        ids.append(f"{os.path.realpath(layer)}@{st.st_dev}:{st.st_ino}:{st.st_ctime_ns}")
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
    return Source(mounted, f"snap-{digest}", f"containerd snapshots {layers[0]}{' ...' if len(layers) > 1 else ''}")


def top_layer(rootfs: Path | Sequence[RootfsMount]) -> Path | None:
    """The directory whose root gives the read-only root tree its attributes, as
    `pykata.resources.mounts.add_rootfs(lower_only=True)` would mount it: an image directory itself,
    a bind's source, an overlay's upper directory, else its first lower one (overlayfs takes a
    directory's attributes from the top-most layer that has it). None for anything else."""
    if isinstance(rootfs, Path):
        return rootfs
    if len(rootfs) != 1:
        return None
    m = rootfs[0]
    if m.type == "bind":
        return Path(m.source)
    if m.type != "overlay":
        return None
    layers, _ = overlay_layers(m.options)
    return Path(layers[0]) if layers and layers[0] else None


@dataclass
class _Scan:
    entries: int = 0
    blocks: int = 0
    fingerprint: hashlib._Hash | None = None
    # (path relative to the root, st) of entries whose times have nanoseconds
    times: list[tuple[str, os.stat_result]] | None = None


class RootImageCache:
    """Builds and keeps image disks under <cache_dir>/rootimages."""

    def __init__(self, runtime: RuntimeConfig, limits: ImageSection | None = None) -> None:
        self.dir = runtime.cache_path / "rootimages"
        self.size = runtime.rootfs_block_max_mib << 20
        self.max_cache = runtime.rootfs_block_cache_mib << 20
        self.limits = limits or ImageSection()

    def ensure(self, source: Source) -> RootImage:
        """The disk of `source`, built now unless cached (blocking: run it in a thread).

        Raises:
            RootImageError: the tree breaks a cap or holds a device node, or mke2fs failed;
                nothing is left in the cache.
        """
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        try:
            root_st = os.lstat(source.tree)
        except OSError as exc:
            raise RootImageError(source.label, f"cannot read its root: {exc.strerror}") from None
        if not stat.S_ISDIR(root_st.st_mode):
            raise RootImageError(source.label, "its root is not a directory")
        scan: _Scan | None = None
        key = source.key
        if key is None:
            scan = self._scan(source, fingerprint=True)
            assert scan.fingerprint is not None
            key = f"tree-{scan.fingerprint.hexdigest()[:32]}"
        key = f"{key}-f{FORMAT}-{self.size >> 20}m"
        final = self.dir / f"{key}{SUFFIX}"
        image = RootImage(key, final, stat.S_IMODE(root_st.st_mode))
        if self._touch(final):
            return _with_usage(image)
        with file_lock(self.dir / f".{key}.lock"):
            if self._touch(final):
                return _with_usage(image)  # built by another process meanwhile
            started = time.monotonic()
            if scan is None:
                scan = self._scan(source, fingerprint=False)
            tmp = self.dir / f".tmp-{key}-{secrets.token_hex(4)}"
            try:
                self._build(source, scan, root_st, tmp)
                os.chmod(tmp, 0o600)
                os.rename(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            log.info("image %s: disk %s built in %.2fs (%d entries)", source.label, final.name,
                     time.monotonic() - started, scan.entries)
        self.evict(keep=final)
        return _with_usage(image)

    def cached(self, source: Source, root_mode: int) -> RootImage | None:
        """The disk of `source` if it is built already (its use recorded), else None; reads nothing
        of the tree, so `source.tree` need not be mounted. `root_mode`: the mode of the tree's root
        (see top_layer). A source without a key (a tree named by its content) is never found here."""
        if source.key is None:
            return None
        key = f"{source.key}-f{FORMAT}-{self.size >> 20}m"
        final = self.dir / f"{key}{SUFFIX}"
        if not self._touch(final):
            return None
        return _with_usage(RootImage(key, final, stat.S_IMODE(root_mode)))

    def built(self, key: str) -> Path | None:
        """The disk of the image whose key (RootImage.key) is `key` if it is built, else None (a key
        that is not a plain file name is never found)."""
        if not key or "/" in key or key.startswith(".") or "\0" in key:
            return None
        final = self.dir / f"{key}{SUFFIX}"
        return final if self._touch(final) else None

    def _touch(self, path: Path) -> bool:
        try:
            os.utime(path)  # the mtime is the last use: eviction goes by it
            return True
        except FileNotFoundError:
            return False

    # -- scan ------------------------------------------------------------------------------------

    def _scan(self, source: Source, *, fingerprint: bool) -> _Scan:
        lim = self.limits
        max_bytes = lim.max_unpacked_mib << 20
        result = _Scan(fingerprint=hashlib.sha256() if fingerprint else None, times=[])
        assert result.times is not None
        root = os.fsencode(source.tree)
        stack: list[bytes] = [b""]
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(os.path.join(root, rel) if rel else root) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                raise RootImageError(source.label, f"cannot read {os.fsdecode(rel) or '/'}: {exc.strerror}") from None
            dir_bytes = 24
            for entry in entries:
                path = os.path.join(rel, entry.name) if rel else entry.name
                name = os.fsdecode(path)
                result.entries += 1
                if result.entries > lim.max_entries:
                    raise RootImageError(source.label, f"more than {lim.max_entries} entries: exceeds "
                                                       f"image.max_entries = {lim.max_entries}")
                if len(path) + 1 > lim.max_path_length:
                    raise RootImageError(source.label, f"entry {name[:200]!r}...: the path exceeds "
                                                       f"image.max_path_length = {lim.max_path_length}")
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    raise RootImageError(source.label, f"entry {name!r}: {exc.strerror}") from None
                mode = st.st_mode
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    raise RootImageError(source.label, f"entry {name!r} is a device node (refused: the "
                                                       "runtime gives containers their /dev)")
                dir_bytes += 8 + (len(entry.name) + 3) // 4 * 4
                if stat.S_ISDIR(mode):
                    stack.append(path)
                    result.blocks += 1
                elif stat.S_ISREG(mode):
                    result.blocks += (st.st_size + BLOCK - 1) // BLOCK
                elif stat.S_ISLNK(mode) and st.st_size >= 60:
                    result.blocks += 1
                if result.blocks * BLOCK > max_bytes:
                    raise RootImageError(source.label, f"more than {lim.max_unpacked_mib} MiB: exceeds "
                                                       f"image.max_unpacked_mib = {lim.max_unpacked_mib}")
                if st.st_mtime_ns % 1_000_000_000 or st.st_ctime_ns % 1_000_000_000 or \
                        st.st_atime_ns % 1_000_000_000:
                    result.times.append((name, st))
                if result.fingerprint is not None:
                    result.fingerprint.update(b"%s\0%d %d %d %d %d %d %d\n" % (
                        path, mode, st.st_ino, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            result.blocks += dir_bytes // BLOCK
        return result

    # -- build -----------------------------------------------------------------------------------

    def _build(self, source: Source, scan: _Scan, root_st: os.stat_result, tmp: Path) -> None:
        inodes = scan.entries + 64
        blocks = int((scan.blocks + inodes * INODE_SIZE // BLOCK) * SLACK) + 1024
        slot_blocks = self.size // BLOCK
        for attempt in range(_BUILD_ATTEMPTS):
            blocks = min(blocks, slot_blocks)
            with open(tmp, "wb") as f:
                f.truncate(self.size)  # sparse: the slot's size, the file system only as big as needed
            try:
                self._mke2fs(source, tmp, blocks, inodes)
                break
            except RootImageError as exc:
                if "Could not allocate" not in str(exc) and "No space" not in str(exc):
                    raise
                if blocks >= slot_blocks or attempt == _BUILD_ATTEMPTS - 1:
                    raise RootImageError(source.label, f"does not fit a disk of runtime.rootfs_block_max_mib = "
                                                       f"{self.size >> 20}") from None
                blocks *= 2
        self._fix_times(source, tmp, scan, root_st)

    def _mke2fs(self, source: Source, tmp: Path, blocks: int, inodes: int) -> None:
        # No dir_index: `mke2fs -d` indexes no directory (a big one stays a linear list either way), and
        # with the feature ext4 reads every one-block directory through its hash-tree path, which hashes
        # and sorts all the names on every readdir (measured in a TCG guest: 20-25% of a warm readdir).
        argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE), "-N", str(inodes),
                "-m", "0", "-O", "^has_journal,^resize_inode,^metadata_csum,^dir_index",
                "-E", "nodiscard,lazy_itable_init=0",
                "-L", "pykata-root", "-d", str(source.tree), str(tmp), str(blocks)]
        self._run(source, argv, "mke2fs")

    def _fix_times(self, source: Source, tmp: Path, scan: _Scan, root_st: os.stat_result) -> None:
        """mke2fs keeps whole seconds and gives the root directory its own owner, mode and times:
        set what the tree has, with debugfs on the unmounted file."""
        lines = [f"sif / mode 0{stat.S_IFMT(root_st.st_mode) | stat.S_IMODE(root_st.st_mode):o}",
                 f"sif / uid {root_st.st_uid}", f"sif / gid {root_st.st_gid}"]
        lines += _time_lines("/", root_st)
        assert scan.times is not None
        for name, st in scan.times:
            if any(c in name for c in '"\\\n\r\t') or not name.isprintable():
                continue  # debugfs cannot be told such a name: the entry keeps whole seconds
            lines += _time_lines(f'"/{name}"', st)
        script = tmp.with_name(tmp.name + ".debugfs")
        script.write_text("\n".join(lines) + "\n")
        try:
            self._run(source, ["debugfs", "-w", "-f", str(script), str(tmp)], "debugfs")
        finally:
            script.unlink(missing_ok=True)

    def _run(self, source: Source, argv: list[str], what: str) -> None:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=MKE2FS_TIMEOUT,
                               env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "LC_ALL": "C"}, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise RootImageError(source.label, f"{argv[0]} is not installed (Debian's e2fsprogs)") from None
        except subprocess.TimeoutExpired:
            raise RootImageError(source.label, f"{what} took longer than {MKE2FS_TIMEOUT:.0f}s") from None
        errors = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
        if p.returncode != 0 or (what == "debugfs" and errors):
            raise RootImageError(source.label, f"{what} failed: {' '.join(errors)[-600:] or p.returncode}")

    # -- eviction --------------------------------------------------------------------------------

    def evict(self, keep: Path | None = None) -> list[str]:
        """Remove the least recently used disks until the cache's allocated bytes are within
        runtime.rootfs_block_cache_mib (never `keep`); unfinished builds older than an hour go too.
        A disk a VM has open stays readable by it (its fd holds the file). Returns removed names."""
        found: list[tuple[float, int, Path]] = []
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.dir):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if entry.name.startswith(".tmp-") and now - st.st_mtime > 3600:
                        os.unlink(entry.path)
                    elif entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                        found.append((st.st_mtime, st.st_blocks * 512, Path(entry.path)))
        total = sum(size for _, size, _ in found)
        removed = []
        for _, size, path in sorted(found):
            if total <= self.max_cache:
                break
            if keep is not None and path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                removed.append(path.name)
                # its build lock goes with it (a builder holding it then makes the disk anew: harmless)
                (self.dir / f".{path.name.removesuffix(SUFFIX)}.lock").unlink(missing_ok=True)
                log.info("rootimages: evicted %s (cache over runtime.rootfs_block_cache_mib)", path.name)
        return removed


def _time_lines(target: str, st: os.stat_result) -> list[str]:
    lines = []
    for field, ns in (("mtime", st.st_mtime_ns), ("atime", st.st_atime_ns), ("ctime", st.st_ctime_ns)):
        sec, frac = divmod(ns, 1_000_000_000)
        if not 0 <= sec < 1 << 31:
            continue  # mke2fs's own value stands (the epoch bits of later dates are its business)
        lines.append(f"sif {target} {field} @{sec}")
        # the extra field: nanoseconds << 2 (the low two bits extend the epoch: zero before 2038)
        lines.append(f"sif {target} {field}_extra {frac << 2}")
    return lines


def _with_usage(image: RootImage) -> RootImage:
    """`image` with the bytes and inodes its file system uses, from its superblock (0 if unreadable)."""
    try:
        with open(image.path, "rb") as f:
            f.seek(1024)
            sb = f.read(32)
        blocks, free = int.from_bytes(sb[4:8], "little"), int.from_bytes(sb[12:16], "little")
        inodes, free_inodes = int.from_bytes(sb[0:4], "little"), int.from_bytes(sb[16:20], "little")
        block = 1024 << int.from_bytes(sb[24:28], "little")
    except OSError:
        return image
    if len(sb) != 32 or free > blocks or block > 65536:
        return image
    return dataclasses.replace(image, used_bytes=(blocks - free) * block,
                               used_inodes=max(inodes - free_inodes, 0))
