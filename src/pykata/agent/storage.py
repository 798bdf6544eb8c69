"""Storages: file systems the agent mounts in the guest for the sandbox or a container.

Mount points must lie in the agent's mount roots (the shared directory and <state>/storage); they
are made and opened component by component without following symlinks, and the mount goes onto
the opened directory (/proc/self/fd/N), so a symlink planted in a shared directory cannot redirect
a mount elsewhere in the guest.

A storage whose mount point is in the pod-volume root (<state>/emptydir/<name>: a pod's emptyDir
volume made in the guest) belongs to the sandbox, not to the container that asked for it first: the
first request mounts it, later ones (other containers of the pod naming the same volume) find it
mounted, and it goes only with the sandbox (unmount_pod_volumes, from DestroySandbox), so a
container that restarts finds what the pod wrote, as a kubelet emptyDir keeps it.

The host's shared directory (a 9p or virtio-fs storage whose mount point is the share root itself)
is the sandbox's too: CreateSandbox mounted it, or (agent protocol 10) the first CreateContainer
that needs it does; requests that come meanwhile wait for that mount and then find it made, and it
goes only with the sandbox (unmount_pod_volumes). Pods that never use it never pay for its mount.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pykata.agent.sysmount import (
    MS_BIND,
    MS_DIRSYNC,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    mount,
    umount,
)
from pykata.agent.validation import (
    check_abs_path,
    check_count,
    check_string,
    check_within,
    is_within,
    open_dir_below,
)
from pykata.errors import Internal, InvalidArgument
from pykata.protocols.agent import agent_pb2
from pykata.record import Record

BLKFLSBUF = 0x1261
# at most this much of a disk is read ahead at mount (bytes; it is page cache: reclaimable)
MAX_PREFETCH = 256 << 20
PREFETCH_CHUNK = 1 << 20
# at most this many entries of a tree are looked up ahead (see warm_tree)
MAX_PREWARM = 200_000

# option -> (flags to set, flags to clear)
FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "bind": (MS_BIND, 0), "rbind": (MS_BIND | MS_REC, 0),
    "defaults": (0, 0),
}
PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC, "slave": MS_SLAVE,
               "rslave": MS_SLAVE | MS_REC, "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC}

TAG_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
DATA_OPTION_RE = re.compile(r"^[A-Za-z0-9_.-]+(=[A-Za-z0-9_.,:/=+-]*)?$")
BLOCK_FSTYPES = frozenset({"ext4", "ext3", "ext2", "xfs", "btrfs", "vfat", "squashfs", "erofs"})
DEVICE_WAIT = 10.0
DRIVERS = ("virtio-fs", "9p", "virtio-blk", "local", "tmpfs", "bind", "overlay")
# a Kubernetes volume name (a DNS-1123 label): the only names a pod volume may have in the guest
POD_VOLUME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# the drivers of the host's shared directory (see the module's docstring)
SHARE_DRIVERS = ("9p", "virtio-fs")


def flush_block_cache(device: str) -> None:
    """Drop the kernel's cached blocks of `device` (BLKFLSBUF): the host may have given the disk new
    content since the guest last read it (an image slot refilled with another image). Raises OSError."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


def prefetch_block(device: str, size: int) -> None:
    """Start reading the first `size` bytes of a mounted `device` in the background: an image disk's
    file system metadata (inode tables, directories) is near its start and read through this same
    cache, and a few large reads cost far less than one small read per lookup (each a trip to the
    VMM). After the mount: mounting sets the device's block size, which empties its cache."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        # the kernel caps one readahead request (a few MiB): ask chunk by chunk
        for offset in range(0, size, PREFETCH_CHUNK):
            os.posix_fadvise(fd, offset, min(PREFETCH_CHUNK, size - offset), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def warm_tree(root: str, max_entries: int) -> None:
    """Look up every entry below `root` (at most `max_entries`), at the lowest CPU priority: a file
    system's first lookup of an entry builds its dentry and inode (for an overlay on an image disk,
    two of each), which costs far more than later ones under emulation; done while the vCPU is idle,
    the container's own first walk finds them made. Reads nothing but metadata; stops at any error
    (the storage was unmounted)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    seen = 0
    stack = [root]
    while stack and seen < max_entries:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    seen += 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        entry.stat(follow_symlinks=False)
                    if seen >= max_entries:
                        break
        except OSError:
            return


def parse_options(field: str, options: Sequence[str]) -> tuple[int, int, list[str]]:
    """fstab options -> (mount flags, propagation flags, file system data options)."""
    check_count(field, options, 64)
    flags, propagation, data = 0, 0, []
    for i, opt in enumerate(options):
        check_string(f"{field}[{i}]", opt, max_len=4096)
        if opt in FLAG_OPTIONS:
            on, off = FLAG_OPTIONS[opt]
            flags = (flags | on) & ~off
        elif opt in PROPAGATION:
            propagation = PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, propagation, data


class Mounted(Record):
    """A storage the agent set up; `mounted` is False for plain directories ("local"); `device` is the
    block device of a virtio-blk storage ("" otherwise)."""

    __slots__ = ("device", "mount_point", "mounted")
    __match_args__ = ("mount_point", "mounted", "device")

    def __init__(self, mount_point: str, mounted: bool, device: str = "") -> None:
        self.mount_point = mount_point
        self.mounted = mounted
        self.device = device


class Storages:
    """Mounts storages inside the allowed roots and unmounts them again."""

    def __init__(self, mount_roots: Sequence[Path], source_roots: Sequence[Path],
                 sys_block: Path = Path("/sys/block"), pod_volume_root: Path | None = None,
                 share_root: Path | None = None) -> None:
        self.mount_roots = list(mount_roots)
        self.source_roots = list(source_roots)
        self.sys_block = sys_block
        self.pod_volume_root = pod_volume_root
        self.share_root = share_root
        # the host's shared directory once mounted: the request that mounted it (serialized) and its mount
        self.share: tuple[bytes, Mounted] | None = None
        self._share_lock = threading.Lock()
        # the pod's volumes mounted so far, by mount point (see the module's docstring)
        self.pod_volumes: dict[str, Mounted] = {}
        self._pod_volume_lock = threading.Lock()
        # disk serial -> its name under /sys/block, as last seen (see _device_by_serial)
        self._serials: dict[str, str] = {}
        # block devices mounted now, with how many of this agent's mounts use each
        self._block_users: dict[str, int] = {}
        self._block_lock = threading.Lock()

    def _mount_point(self, field: str, path: str) -> tuple[Path, list[str]]:
        norm = check_abs_path(field, path)
        for root in self.mount_roots:
            if is_within(norm, root) and norm != "/":
                rel = norm[len(str(root).rstrip("/")):].strip("/")
                return root, [p for p in rel.split("/") if p]
        raise InvalidArgument(field, f"{norm!r} is outside the agent's mount roots "
                             f"({', '.join(map(str, self.mount_roots))})")

    def mount(self, storage: agent_pb2.Storage, field: str) -> Mounted:
        """Mount one storage. Raises InvalidArgument naming a bad field, Internal when
        the kernel refuses."""
        try:
            return self._mount(storage, field)
        except OSError as exc:
            raise Internal(f"{field}: {exc.strerror or exc}") from None

    def _mount(self, storage: agent_pb2.Storage, field: str) -> Mounted:
        root, parts = self._mount_point(f"{field}.mount_point", storage.mount_point)
        if self.pod_volume_root is not None and root == self.pod_volume_root:
            return self._pod_volume(storage, field, parts)
        if root == self.share_root and not parts and storage.driver in SHARE_DRIVERS:
            return self._share(storage, field, root)
        return self._mount_at(storage, field, root, parts)

    def _share(self, storage: agent_pb2.Storage, field: str, root: Path) -> Mounted:
        """The host's shared directory: mounted by its first request, found mounted by the later ones
        (which wait while it is being mounted), kept until unmount_pod_volumes. The asker's own list
        gets it as not mounted (it never unmounts it). Raises InvalidArgument when it is mounted
        already from a different request (another tag or other options)."""
        key = storage.SerializeToString(deterministic=True)
        with self._share_lock:
            if self.share is None:
                self.share = (key, self._mount_at(storage, field, root, []))
            elif self.share[0] != key:
                raise InvalidArgument(field, f"the shared directory {root} is mounted already, "
                                             "from another source or with other options")
        return Mounted(str(root), mounted=False)

    def _pod_volume(self, storage: agent_pb2.Storage, field: str, parts: list[str]) -> Mounted:
        """A pod volume: mounted by its first request, shared by the later ones, kept until
        unmount_pod_volumes. The container's own list gets it as not mounted (it never unmounts it)."""
        assert self.pod_volume_root is not None
        if len(parts) != 1 or not POD_VOLUME_RE.match(parts[0]):
            raise InvalidArgument(f"{field}.mount_point", f"{storage.mount_point!r} is not "
                                  f"{self.pod_volume_root}/<volume name> (a DNS-1123 label)")
        if storage.driver != "tmpfs":
            raise InvalidArgument(f"{field}.driver", f"a pod volume is a tmpfs, not {storage.driver!r}")
        where = str(self.pod_volume_root / parts[0])
        with self._pod_volume_lock:
            if where not in self.pod_volumes:
                self.pod_volumes[where] = self._mount_at(storage, field, self.pod_volume_root, parts)
        return Mounted(where, mounted=False)

    def has_pod_volume(self, where: str) -> bool:
        """Whether the pod volume at `where` is mounted."""
        with self._pod_volume_lock:
            return where in self.pod_volumes

    def unmount_pod_volumes(self) -> list[str]:
        """Unmount the pod's volumes and the shared directory (DestroySandbox); returns error messages."""
        with self._pod_volume_lock:
            volumes, self.pod_volumes = list(self.pod_volumes.values()), {}
        errors = self.unmount(volumes)
        with self._share_lock:
            share, self.share = self.share, None
        if share is not None:
            errors += self.unmount([share[1]])
        return errors

    def _mount_at(self, storage: agent_pb2.Storage, field: str, root: Path, parts: list[str]) -> Mounted:
        driver = storage.driver
        mode = 0o755
        prefetch = prewarm = 0
        for i, opt in enumerate(storage.driver_options):
            check_string(f"{field}.driver_options[{i}]", opt, max_len=256)
            if opt.startswith("mode="):
                try:
                    mode = int(opt[5:], 8) & 0o7777
                except ValueError:
                    raise InvalidArgument(f"{field}.driver_options[{i}]", f"bad mode {opt!r}") from None
            elif opt.startswith("prewarm="):
                try:
                    prewarm = min(max(int(opt[8:]), 0), MAX_PREWARM)
                except ValueError:
                    raise InvalidArgument(f"{field}.driver_options[{i}]", f"bad prewarm {opt!r}") from None
            elif opt.startswith("prefetch="):
                try:
                    prefetch = min(max(int(opt[9:]), 0), MAX_PREFETCH)
                except ValueError:
                    raise InvalidArgument(f"{field}.driver_options[{i}]", f"bad prefetch {opt!r}") from None
        flags, propagation, data = parse_options(f"{field}.options", storage.options)
        fstype = storage.fstype
        source = storage.source
        if driver == "virtio-fs":
            fstype = "virtiofs"
            self._tag(f"{field}.source", source)
        elif driver == "9p":
            fstype = "9p"
            self._tag(f"{field}.source", source)
            if not any(d.startswith("trans=") for d in data):
                data = ["trans=virtio", "version=9p2000.L", *data]
        elif driver == "virtio-blk":
            if source.startswith("serial:"):
                source = self._device_by_serial(f"{field}.source", source.removeprefix("serial:"))
            source = str(check_within(f"{field}.source", source, [Path("/dev")]))
            if fstype not in BLOCK_FSTYPES:
                raise InvalidArgument(f"{field}.fstype", f"{fstype!r} is not one of {sorted(BLOCK_FSTYPES)}")
            with self._block_lock:
                in_use = self._block_users.get(source, 0) > 0
            if in_use:
                # Another container's mount of this disk is alive, so the host has not given the slot
                # new content since (it refills a slot only once no container uses it), and the cache
                # holds what that mount read: dropping it (and reading it ahead again) would only
                # make both containers read the disk again.
                prefetch = 0
            else:
                flush_block_cache(source)
        elif driver == "tmpfs":
            fstype, source = "tmpfs", source or "tmpfs"
            self._tag(f"{field}.source", source)
        elif driver == "bind":
            source = str(check_within(f"{field}.source", source, self.source_roots))
            fstype, flags = "", flags | MS_BIND | MS_REC
        elif driver == "overlay":
            fstype, source = "overlay", "overlay"
            data = [self._overlay_option(f"{field}.options", d) for d in data]
        elif driver == "local":
            fd = open_dir_below(root, parts, create_mode=mode, field=f"{field}.mount_point")
            os.close(fd)
            return Mounted(str(root.joinpath(*parts)), mounted=False)
        else:
            raise InvalidArgument(f"{field}.driver", f"{driver!r} is not one of {', '.join(DRIVERS)}")
        for i, d in enumerate(data):
            if not DATA_OPTION_RE.match(d):
                raise InvalidArgument(f"{field}.options", f"option {i} {d!r} has unexpected characters")
        fd = open_dir_below(root, parts, create_mode=0o755, field=f"{field}.mount_point")
        try:
            target = f"/proc/self/fd/{fd}"
            mount(source, target, fstype, flags & ~MS_RDONLY if flags & MS_BIND else flags, ",".join(data))
            where = str(root.joinpath(*parts))
            try:
                if flags & MS_BIND and flags & MS_RDONLY:
                    # A bind mount ignores MS_RDONLY until it is remounted.
                    keep = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
                    mount("", where, "", MS_REMOUNT | MS_BIND | MS_RDONLY | keep, "")
                if propagation:
                    mount("", where, "", propagation, "")
                if prefetch and driver == "virtio-blk":
                    prefetch_block(source, prefetch)
                if prewarm:
                    threading.Thread(target=warm_tree, args=(where, prewarm), name=f"prewarm {where}",
                                     daemon=True).start()
            except OSError:
                umount(where)
                raise
        finally:
            os.close(fd)
        if driver == "virtio-blk":
            with self._block_lock:
                self._block_users[source] = self._block_users.get(source, 0) + 1
            return Mounted(where, mounted=True, device=source)
        return Mounted(where, mounted=True)

    def _device_by_serial(self, field: str, serial: str) -> str:
        """/dev/vdX of the virtio disk whose serial (QEMU `serial=`) is `serial`; waits a little,
        since a hot-plugged disk appears asynchronously.

        A scan of /sys/block learns every disk's serial, and a later lookup first checks the disk it
        learned by one read of that disk's serial (the image slots are fixed devices, so the pooled VM's
        warm-up lookup serves the pod's): a scan read every disk's serial through pathlib's glob, 2-4
        ms of every container's start under TCG with a single disk."""
        self._tag(field, serial)
        for _ in range(int(DEVICE_WAIT / 0.05)):
            known = self._serials.get(serial)
            if known is not None and self._read_serial(known) == serial and os.path.exists(f"/dev/{known}"):
                return f"/dev/{known}"
            try:
                names = sorted(os.listdir(self.sys_block))
            except OSError:
                names = []
            seen: dict[str, str] = {}
            for name in names:
                found = self._read_serial(name)
                if found is not None:
                    seen.setdefault(found, name)  # two disks with one serial: the first name, as before
            self._serials.update(seen)
            if serial in seen and os.path.exists(f"/dev/{seen[serial]}"):
                return f"/dev/{seen[serial]}"
            time.sleep(0.05)
        raise InvalidArgument(field, f"no virtio disk with serial {serial!r} appeared within {DEVICE_WAIT}s")

    def _read_serial(self, name: str) -> str | None:
        """The serial of disk `name` (/sys/block/NAME/serial), None when it has none or is gone."""
        try:
            with open(os.path.join(self.sys_block, name, "serial"), encoding="utf-8", errors="replace") as f:
                return f.read(256).strip()
        except OSError:
            return None

    def _tag(self, field: str, tag: str) -> None:
        if not TAG_RE.match(tag):
            raise InvalidArgument(field, f"{tag!r} is not a valid tag")

    def _overlay_option(self, field: str, option: str) -> str:
        key, sep, value = option.partition("=")
        if key in ("lowerdir", "upperdir", "workdir") and sep:
            paths = value.split(":")
            resolved = [str(check_within(f"{field}.{key}", p, self.source_roots)) for p in paths]
            return f"{key}={':'.join(resolved)}"
        return option

    def unmount(self, mounts: Sequence[Mounted]) -> list[str]:
        """Unmount in reverse order; returns error messages (teardown goes on regardless)."""
        errors = []
        for m in reversed(mounts):
            if m.mounted:
                try:
                    umount(m.mount_point)
                except OSError as exc:
                    errors.append(str(exc))
                if m.device:
                    # even when the unmount failed: the host may then refill the slot, and the next
                    # mount must drop the cache as before
                    with self._block_lock:
                        left = self._block_users.get(m.device, 0) - 1
                        if left > 0:
                            self._block_users[m.device] = left
                        else:
                            self._block_users.pop(m.device, None)
                with contextlib.suppress(OSError):
                    os.rmdir(m.mount_point)
        return errors
