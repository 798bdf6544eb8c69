"""Host mounts a sandbox makes (container root overlays, volume binds), safe against a hostile guest.

Kata's layout (CVE-2020-2026): the host mounts only inside a host-private directory the guest never
sees, and the guest sees it through a read-only view:

    <sandbox>/            0700, a private bind of itself: nothing mounted below leaks to other
                          mount namespaces, and nothing from the host propagates in
    <sandbox>/mounts/     where the host mounts (<cid>/rootfs, <cid>/volumes/<n>); its own peer group
    <sandbox>/shared/     read-only bind of mounts/, a slave of it: what virtiofsd / 9p serve

The guest can write inside a container's root or a rw volume, but no directory the host mounts on,
so it cannot plant the `volumes/0 -> /etc/cron.d` symlink that made the host mount over a host path.
Besides, every mount target is opened component by component with O_PATH|O_NOFOLLOW and the mount
goes onto that fd (/proc/self/fd/N or move_mount), and each mount is undone through an fd on the
mount itself, kept from when it was made: never by resolving a path again.

Every mount here is nosuid,nodev,noexec (the host never runs or opens devices from a guest's tree);
read-only is recursive (mount_setattr with AT_RECURSIVE, kernel >= 5.12; else each sub-mount is
remounted keeping its own flags); volume binds are private unless the spec asks for (r)slave or
(r)shared, as runc does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pykata.resources import mountapi
from pykata.resources.mountapi import (
    AT_EMPTY_PATH,
    AT_RECURSIVE,
    HARDENED,
    MNT_DETACH,
    MOVE_MOUNT_F_EMPTY_PATH,
    MOVE_MOUNT_T_EMPTY_PATH,
    MS_BIND,
    MS_MOVE,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_SHARED,
    MS_SLAVE,
    OPEN_TREE_CLONE,
    PROPAGATION,
    SYS_MOVE_MOUNT,
    SYS_OPEN_TREE,
    UMOUNT_NOFOLLOW,
    MountError,
    fd_path,
    libc,
    mount,
    mount_id,
    mountinfo,
    open_beneath,
    set_attributes,
    syscall,
)

log = logging.getLogger("pykata.mounts")


# -- mounting ------------------------------------------------------------------------------------


@dataclass
class MountRecord:
    """A mount this module made: `fd` is an O_PATH fd on the mount's root, kept to undo it."""

    path: Path
    fd: int
    mnt_id: int

    def unmount(self) -> None:
        """Detach the mount through its own fd (no path lookup). Idempotent."""
        if self.fd < 0:
            return
        try:
            if libc.umount2(fd_path(self.fd).encode(), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                # EINVAL: not (any more) the root of a mount: it was detached already
                if err != errno.EINVAL:
                    raise MountError(str(self.path), f"unmount: {os.strerror(err)}")
        finally:
            os.close(self.fd)
            self.fd = -1


def _record(path: Path, root_fd: int) -> MountRecord:
    return MountRecord(path, root_fd, mount_id(root_fd))


def _reopen_mounted(base: Path, rel: str, covered_fd: int) -> MountRecord:
    """After a mount(2) onto `covered_fd`: an fd on the new mount's root, checked to be a new mount."""
    root = open_beneath(base, rel)
    if mount_id(root) == mount_id(covered_fd):
        os.close(root)
        raise MountError(str(base / rel), "the mount did not land where it was made")
    return _record(base / rel, root)


def bind(source: Path, base: Path, rel: str, *, readonly: bool = False, propagation: str = "rprivate",
         no_symlinks: bool = False) -> MountRecord:
    """Bind `source` (recursively) on `base`/`rel`, made if missing as a file or directory like the
    source; nosuid,nodev,noexec, read-only all the way down if asked, `propagation` as in a spec.
    `no_symlinks`: `source` is a resolved path that was checked (a volume's host path, see
    ocispec.check_host_bind_sources), so no component of it may be a symlink now.

    Raises MountError (missing source, a symlink in a `no_symlinks` source, symlinked target, unknown
    propagation)."""
    if propagation not in PROPAGATION:
        raise MountError(str(base / rel), f"unsupported propagation {propagation!r}")
    prop = PROPAGATION[propagation]
    flags = HARDENED | (MS_RDONLY if readonly else 0)
    try:
        src = open_without_symlinks(source) if no_symlinks else os.open(source, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(str(base / rel), f"source {source}: {exc.strerror}") from None
    try:
        is_dir = stat.S_ISDIR(os.fstat(src).st_mode)
        target = open_beneath(base, rel, make="dir" if is_dir else "file")
        try:
            if mountapi.use_new_mount_api:
                return _bind_detached(src, target, base / rel, flags, prop)
            return _bind_staged(src, target, base, rel, is_dir, flags, prop)
        finally:
            os.close(target)
    finally:
        os.close(src)


def open_without_symlinks(path: Path) -> int:
    """An O_PATH descriptor of the absolute `path`, opened one component at a time without following
    any symlink. Raises OSError: ELOOP (with a message saying so) when a component is a symlink."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in path.parts[1:]:
            if part in (".", ".."):
                raise OSError(errno.EINVAL, f"{path} is not a resolved path")
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, f"{part} in it is now a symbolic link (it was not when checked)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _bind_staged(src: int, target: int, base: Path, rel: str, is_dir: bool, flags: int, prop: int) -> MountRecord:
    # Without mount_setattr on detached trees (kernel < 5.12): bind in a private staging place next
    # to `base`, set flags and propagation there, then move it: the copies the move propagates to
    # the shared view are made of the finished mount (a bind made in place would leave them writable).
    stage_name = f".staging-{os.getpid()}-{secrets.token_hex(4)}"
    stage = open_beneath(base.parent, stage_name, make="dir" if is_dir else "file")
    try:
        mount(fd_path(src), fd_path(stage), None, MS_BIND | MS_REC, name=str(base / rel))
        rec = _reopen_mounted(base.parent, stage_name, stage)
    finally:
        os.close(stage)
    rec.path = base / rel
    try:
        set_attributes(rec.fd, flags, propagation=prop, name=str(rec.path))
        mount(fd_path(rec.fd), fd_path(target), None, MS_MOVE, name=str(rec.path))
        if prop == MS_PRIVATE:
            set_attributes(rec.fd, 0, propagation=MS_PRIVATE, name=str(rec.path))
    except BaseException:
        rec.unmount()
        raise
    finally:
        with contextlib.suppress(OSError):
            (os.rmdir if is_dir else os.unlink)(base.parent / stage_name)
    return rec


def _bind_detached(src: int, target: int, path: Path, flags: int, prop: int) -> MountRecord:
    # A detached copy gets its flags and propagation before it is attached, so it never is, even
    # for a moment, a writable peer of the source's mount (the host root's peer group on most hosts).
    try:
        tree = syscall(SYS_OPEN_TREE, ctypes.c_int(src), b"",
                        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE))
    except OSError as exc:
        raise MountError(str(path), f"open_tree: {exc.strerror}") from None
    try:
        set_attributes(tree, flags, propagation=prop, name=str(path))
        syscall(SYS_MOVE_MOUNT, ctypes.c_int(tree), b"", ctypes.c_int(target), b"",
                 ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
        if prop == MS_PRIVATE:
            # attached under a shared parent it became shared; private it is (its copies in the
            # shared view were made at the attach and stay until it is unmounted)
            set_attributes(tree, 0, propagation=MS_PRIVATE, name=str(path))
    except OSError as exc:
        os.close(tree)
        raise MountError(str(path), f"move_mount: {exc.strerror}") from None
    except BaseException:
        os.close(tree)
        raise
    return _record(path, tree)


def overlay(lower: Path, upper: Path, work: Path, base: Path, rel: str) -> MountRecord:
    """Mount an overlay of read-only `lower` with writable `upper` on `base`/`rel`. Raises MountError."""
    upper.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    upper.mkdir(exist_ok=True)
    # the overlay's root takes the upper directory's mode: the image root's, as under runc
    os.chmod(upper, stat.S_IMODE(os.stat(lower).st_mode))
    return mount_fs("overlay", f"lowerdir={lower},upperdir={upper},workdir={work}", base, rel)


def mount_fs(fstype: str, data: str, base: Path, rel: str, flags: int = 0) -> MountRecord:
    """Mount a file system of `fstype` on `base`/`rel` (made if missing), nosuid,nodev,noexec."""
    target = open_beneath(base, rel, make="dir")
    try:
        mount(fstype, fd_path(target), fstype, flags | HARDENED, data, name=str(base / rel))
        return _reopen_mounted(base, rel, target)
    finally:
        os.close(target)


@dataclass(frozen=True)
class RootfsMount:
    """One mount of a container's root filesystem, as containerd's Mount message has it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


_FLAG_OPTIONS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "bind": MS_BIND,
                 "rbind": MS_BIND | MS_REC}
_IGNORED_OPTIONS = {"rw", "defaults", "suid", "dev", "exec"}


def mount_all(rootfs_mounts: Sequence[RootfsMount], base: Path, rel: str) -> list[MountRecord]:
    """Mount containerd-style root mounts on `base`/`rel`, in order; undoes them all on failure.

    Raises MountError naming the mount that failed (unsupported type or option, bad source).
    """
    done: list[MountRecord] = []
    try:
        for m in rootfs_mounts:
            flags = 0
            data = []
            for opt in m.options:
                if opt in _FLAG_OPTIONS:
                    flags |= _FLAG_OPTIONS[opt]
                elif opt not in _IGNORED_OPTIONS:
                    data.append(opt)
            if m.type == "bind" or flags & MS_BIND:
                done.append(bind(Path(m.source), base, rel, readonly=bool(flags & MS_RDONLY)))
            elif m.type == "overlay":
                for opt in data:
                    if "," in opt:
                        raise MountError(str(base / rel), f"overlay option {opt!r} has a comma")
                done.append(mount_fs("overlay", ",".join(data), base, rel, flags & ~(MS_BIND | MS_REC)))
            else:
                raise MountError(str(base / rel), f"unsupported root mount type {m.type!r}")
    except BaseException:
        for rec in reversed(done):
            rec.unmount()
        raise
    return done


def overlay_layers(options: Sequence[str]) -> tuple[list[str], list[str]]:
    """An overlay mount's layer directories, top-most first (its upper directory, then its lower ones),
    and its other data options (not workdir, flags or ignored options)."""
    layers: list[str] = []
    upper = ""
    data = []
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            layers += value.split(":")
        elif key == "upperdir":
            upper = value
        elif key == "workdir" or opt in _FLAG_OPTIONS or opt in _IGNORED_OPTIONS:
            continue
        else:
            data.append(opt)
    return ([upper, *layers] if upper else layers), data


def lower_all(rootfs_mounts: Sequence[RootfsMount], base: Path, rel: str) -> list[MountRecord]:
    """Mount the read-only part of containerd-style root mounts on `base`/`rel`: an overlay's
    upper directory and lower directories as one read-only overlay (or a read-only bind of the
    only one), a bind read-only. The guest stacks its own writable layer on it. Raises MountError."""
    if len(rootfs_mounts) != 1:
        return _readonly(mount_all(rootfs_mounts, base, rel), base / rel)
    m = rootfs_mounts[0]
    if m.type != "overlay":
        return _readonly(mount_all(rootfs_mounts, base, rel), base / rel)
    layers, data = overlay_layers(m.options)
    if not layers:
        raise MountError(str(base / rel), "overlay root mount without lowerdir")
    if len(layers) == 1:
        return [bind(Path(layers[0]), base, rel, readonly=True)]
    return mount_all([RootfsMount("overlay", "overlay", ("ro", f"lowerdir={':'.join(layers)}", *data))], base, rel)


def _readonly(recs: list[MountRecord], path: Path) -> list[MountRecord]:
    try:
        for rec in recs:
            set_attributes(rec.fd, MS_RDONLY, name=str(path))
    except BaseException:
        _unmount_records(recs)
        raise
    return recs


# -- one sandbox's tree --------------------------------------------------------------------------

SANDBOX_DIR_MODE = 0o700
MOUNTS = "mounts"
SHARED = "shared"


@dataclass
class SandboxMounts:
    """The mounts of one sandbox: its private tree, the read-only shared view, and per container
    the mounts made for it (each undone through its own fd)."""

    dir: Path
    base: list[MountRecord] = field(default_factory=list)
    containers: dict[str, list[MountRecord]] = field(default_factory=dict)

    @property
    def mounts_dir(self) -> Path:
        return self.dir / MOUNTS

    @property
    def shared_dir(self) -> Path:
        return self.dir / SHARED

    def setup(self) -> None:
        """Make <dir> a private mount, mounts/ a peer group of its own and shared/ its read-only
        slave. `dir` must exist. Raises MountError; undoes what it did on failure."""
        try:
            top = open_beneath(self.dir, "")
            try:
                mount(fd_path(top), fd_path(top), None, MS_BIND, name=str(self.dir))
                sandbox = _reopen_mounted(self.dir.parent, self.dir.name, top)
            finally:
                os.close(top)
            self.base.append(sandbox)
            set_attributes(sandbox.fd, HARDENED, propagation=MS_PRIVATE, name=str(self.dir))
            os.chmod(self.dir, SANDBOX_DIR_MODE)
            mounts = self._self_bind(MOUNTS)
            set_attributes(mounts.fd, 0, propagation=MS_SHARED, name=str(mounts.path))
            target = open_beneath(self.dir, SHARED, make="dir")
            try:
                mount(fd_path(mounts.fd), fd_path(target), None, MS_BIND, name=str(self.shared_dir))
                shared = _reopen_mounted(self.dir, SHARED, target)
            finally:
                os.close(target)
            self.base.append(shared)
            set_attributes(shared.fd, MS_RDONLY, propagation=MS_SLAVE, name=str(shared.path))
        except BaseException:
            self.teardown()
            raise

    def _self_bind(self, rel: str) -> MountRecord:
        target = open_beneath(self.dir, rel, make="dir")
        try:
            mount(fd_path(target), fd_path(target), None, MS_BIND, name=str(self.dir / rel))
            rec = _reopen_mounted(self.dir, rel, target)
        finally:
            os.close(target)
        self.base.append(rec)
        return rec

    def add_rootfs(self, cid: str, rootfs: Path | Sequence[RootfsMount], overlay_dir: Path, *,
                   lower_only: bool = False) -> None:
        """Mount a container's root on mounts/<cid>/rootfs: an overlay on a read-only image
        directory, or containerd's root mounts. `lower_only`: only the read-only layers (the guest
        makes the writable one). Raises MountError."""
        rel = f"{cid}/rootfs"
        if lower_only:
            recs = ([bind(rootfs, self.mounts_dir, rel, readonly=True)] if isinstance(rootfs, Path)
                    else lower_all(rootfs, self.mounts_dir, rel))
        elif isinstance(rootfs, Path):
            recs = [overlay(rootfs, overlay_dir / "upper", overlay_dir / "work", self.mounts_dir, rel)]
        else:
            recs = mount_all(rootfs, self.mounts_dir, rel)
        self.containers.setdefault(cid, []).extend(recs)

    def add_volume(self, cid: str, index: int, source: Path, *, readonly: bool,
                   propagation: str = "rprivate") -> None:
        """Bind a host path on mounts/<cid>/volumes/<index>. Raises MountError."""
        rec = bind(source, self.mounts_dir, f"{cid}/volumes/{index}", readonly=readonly, propagation=propagation,
                   no_symlinks=True)
        self.containers.setdefault(cid, []).append(rec)

    def release(self, cid: str) -> None:
        """Undo a container's mounts, newest first. Idempotent; raises MountError (after trying all)."""
        _unmount_records(self.containers.pop(cid, []))

    def teardown(self) -> None:
        """Undo every mount of the sandbox. Idempotent; raises MountError (after trying all)."""
        recs = [r for cid in list(self.containers) for r in self.containers.pop(cid)]
        try:
            _unmount_records(recs)
        finally:
            base, self.base = self.base, []
            _unmount_records(base)

    def __iter__(self) -> Iterator[MountRecord]:
        yield from self.base
        for recs in self.containers.values():
            yield from recs


def remove_unmounted(path: Path) -> None:
    """Remove `path` (a container's directory below mounts/) unless something is still mounted
    below it: deleting through a mount that stayed would delete a volume's host data."""
    left = mounts_under(path)
    if left:
        log.warning("not removing %s: still mounted: %s", path, ", ".join(map(str, left)))
        return
    shutil.rmtree(path, ignore_errors=True)


def _unmount_records(recs: list[MountRecord]) -> None:
    first: MountError | None = None
    for rec in reversed(recs):
        try:
            rec.unmount()
        except MountError as e:
            log.warning("%s", e)
            first = first or e
    if first is not None:
        raise first


# -- crash cleanup (no fds: another process) -----------------------------------------------------


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below `prefix`, deepest first (the order to unmount them)."""
    p = str(prefix).rstrip("/")
    found = {Path(mp) for _, _, mp in mountinfo() if mp == p or mp.startswith(p + "/")}
    return sorted(found, key=lambda x: len(x.parts), reverse=True)


def unmount(target: Path) -> bool:
    """Lazily unmount `target` (not following a symlink there) and everything under it; False if
    nothing was mounted. Idempotent."""
    unmounted = False
    while True:
        rc = libc.umount2(str(target).encode(), MNT_DETACH | UMOUNT_NOFOLLOW)
        if rc == 0:
            unmounted = True
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):  # not a mount point (any more)
            return unmounted
        raise MountError(str(target), os.strerror(err))


def unmount_all(prefix: Path) -> int:
    """Unmount everything at or below `prefix`; returns how many were unmounted. For a sandbox
    whose owner died (its fds with it): the paths come from the kernel's mount table, and a mount
    of ours is never below a directory the guest can write."""
    n = 0
    for mp in mounts_under(prefix):
        n += unmount(mp)
    return n
