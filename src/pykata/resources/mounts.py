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

from pykata.errors import PykataError

log = logging.getLogger("pykata.mounts")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# Flags a bind remount must repeat or lose (statvfs's ST_* equal the MS_* values for these).
_KEPT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | 0x10 | 0x40 | 0x400 | 0x800 | 0x200000
HARDENED = MS_NOSUID | MS_NODEV | MS_NOEXEC

# x86_64 syscall numbers of the new mount API.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
# MOUNT_ATTR_* equal MS_* for these three; MOUNT_ATTR_NOEXEC is 0x8 as well.
_MOUNT_ATTR = {MS_RDONLY: 0x1, MS_NOSUID: 0x2, MS_NODEV: 0x4, MS_NOEXEC: 0x8}

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
# Tests turn this off to exercise the path for kernels before 5.12.
use_new_mount_api = True

PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_PRIVATE, "slave": MS_SLAVE, "rslave": MS_SLAVE,
               "shared": MS_SHARED, "rshared": MS_SHARED}


class MountError(PykataError):
    """A mount or unmount failed or was refused; `target` names the mount point."""

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"mount {target}: {message}")
        self.target = target


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(nr: int, *args: object) -> int:
    rc = int(_libc.syscall(ctypes.c_long(nr), *args))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None,
           *, name: str | None = None) -> None:
    rc = _libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(name or target, os.strerror(err))


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def mount_id(fd: int) -> int:
    """The kernel's id of the mount `fd` is on (as in /proc/self/mountinfo's first field)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise MountError(str(fd), "the kernel reports no mnt_id")


# -- resolving targets without following symlinks -----------------------------------------------


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p]
    for p in parts:
        if p in (".", ".."):
            raise MountError(rel, f"path component {p!r} is not allowed")
    return parts


def open_beneath(base: Path, rel: str, *, make: str | None = None, mode: int = 0o755) -> int:
    """An O_PATH fd on `base`/`rel`, opened one component at a time without following symlinks.

    `make`: "dir" or "file" creates what is missing (the last component as that kind). The caller
    closes the fd. Raises MountError when a component is a symlink or not what it must be.
    """
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    parts = _parts(rel)
    shown = base
    try:
        for i, name in enumerate(parts):
            shown = shown / name
            last = i == len(parts) - 1
            want_file = last and make == "file"
            try:
                nxt = _open_component(fd, name, want_file, make is not None, mode)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise MountError(str(shown), "is a symlink or not a directory: refused") from None
                raise MountError(str(shown), exc.strerror or str(exc)) from None
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if want_file and not stat.S_ISREG(st.st_mode):
                raise MountError(str(shown), "is a symlink or not a regular file: refused")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_component(dir_fd: int, name: str, want_file: bool, create: bool, mode: int) -> int:
    flags = _PATH_FLAGS if want_file else _PATH_FLAGS | os.O_DIRECTORY
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    if want_file:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=dir_fd))
    else:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=dir_fd)
    return os.open(name, flags, dir_fd=dir_fd)


# -- mount flags ---------------------------------------------------------------------------------


def _mountinfo() -> list[tuple[int, int, str]]:
    """(mount id, parent id, mount point) of every mount of this namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            out.append((int(fields[0]), int(fields[1]), _unescape(fields[4])))
    return out


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def set_attributes(fd: int, flags: int, *, propagation: int = 0, name: str = "") -> None:
    """Add mount `flags` (MS_RDONLY/NOSUID/NODEV/NOEXEC) to the mount at `fd` and every mount
    below it, keeping the flags each already has, and set their propagation if given.

    Raises MountError."""
    if use_new_mount_api:
        attr = _MountAttr(sum(v for k, v in _MOUNT_ATTR.items() if flags & k), 0, propagation, 0)
        try:
            _syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"", ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE),
                     ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
            return
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise MountError(name or _fd_path(fd), f"mount_setattr: {exc.strerror}") from None
    _set_attributes_walk(fd, flags, propagation, name or _fd_path(fd))


def _set_attributes_walk(fd: int, flags: int, propagation: int, name: str) -> None:
    """mount_setattr(AT_RECURSIVE) for kernels before 5.12: remount the mount at `fd` and each
    sub-mount, each reached by an fd opened without following symlinks and checked by mount id."""
    infos = _mountinfo()
    top = mount_id(fd)
    points = {mid: mp for mid, _, mp in infos}
    if top not in points:
        raise MountError(name, "mount not found in mountinfo")
    children: dict[int, list[int]] = {}
    for mid, parent, _ in infos:
        children.setdefault(parent, []).append(mid)
    todo, seen = [top], []
    while todo:
        mid = todo.pop()
        seen.append(mid)
        todo += [c for c in children.get(mid, []) if c != mid]
    root = points[top].rstrip("/")
    for mid in seen:
        rel = points[mid][len(root):].lstrip("/") if mid != top else ""
        sub = open_beneath(Path(_fd_path(fd)), rel) if rel else os.dup(fd)
        try:
            if mount_id(sub) != mid:
                raise MountError(f"{name}/{rel}", "a sub-mount moved while being remounted: refused")
            if flags:
                kept = os.fstatvfs(sub).f_flag & _KEPT_FLAGS
                _mount(None, _fd_path(sub), None, MS_REMOUNT | MS_BIND | kept | flags, name=f"{name}/{rel}")
            if propagation:
                _mount(None, _fd_path(sub), None, propagation, name=f"{name}/{rel}")
        finally:
            os.close(sub)


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
            if _libc.umount2(_fd_path(self.fd).encode(), MNT_DETACH) != 0:
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


def bind(source: Path, base: Path, rel: str, *, readonly: bool = False, propagation: str = "rprivate") -> MountRecord:
    """Bind `source` (recursively) on `base`/`rel`, made if missing as a file or directory like the
    source; nosuid,nodev,noexec, read-only all the way down if asked, `propagation` as in a spec.

    Raises MountError (missing source, symlinked target, unknown propagation)."""
    if propagation not in PROPAGATION:
        raise MountError(str(base / rel), f"unsupported propagation {propagation!r}")
    prop = PROPAGATION[propagation]
    flags = HARDENED | (MS_RDONLY if readonly else 0)
    try:
        src = os.open(source, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(str(base / rel), f"source {source}: {exc.strerror}") from None
    try:
        is_dir = stat.S_ISDIR(os.fstat(src).st_mode)
        target = open_beneath(base, rel, make="dir" if is_dir else "file")
        try:
            if use_new_mount_api:
                return _bind_detached(src, target, base / rel, flags, prop)
            return _bind_staged(src, target, base, rel, is_dir, flags, prop)
        finally:
            os.close(target)
    finally:
        os.close(src)


def _bind_staged(src: int, target: int, base: Path, rel: str, is_dir: bool, flags: int, prop: int) -> MountRecord:
    # Without mount_setattr on detached trees (kernel < 5.12): bind in a private staging place next
    # to `base`, set flags and propagation there, then move it: the copies the move propagates to
    # the shared view are made of the finished mount (a bind made in place would leave them writable).
    stage_name = f".staging-{os.getpid()}-{secrets.token_hex(4)}"
    stage = open_beneath(base.parent, stage_name, make="dir" if is_dir else "file")
    try:
        _mount(_fd_path(src), _fd_path(stage), None, MS_BIND | MS_REC, name=str(base / rel))
        rec = _reopen_mounted(base.parent, stage_name, stage)
    finally:
        os.close(stage)
    rec.path = base / rel
    try:
        set_attributes(rec.fd, flags, propagation=prop, name=str(rec.path))
        _mount(_fd_path(rec.fd), _fd_path(target), None, MS_MOVE, name=str(rec.path))
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
        tree = _syscall(_SYS_OPEN_TREE, ctypes.c_int(src), b"",
                        ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH | _AT_RECURSIVE))
    except OSError as exc:
        raise MountError(str(path), f"open_tree: {exc.strerror}") from None
    try:
        set_attributes(tree, flags, propagation=prop, name=str(path))
        _syscall(_SYS_MOVE_MOUNT, ctypes.c_int(tree), b"", ctypes.c_int(target), b"",
                 ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH))
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
        _mount(fstype, _fd_path(target), fstype, flags | HARDENED, data, name=str(base / rel))
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


def lower_all(rootfs_mounts: Sequence[RootfsMount], base: Path, rel: str) -> list[MountRecord]:
    """Mount the read-only part of containerd-style root mounts on `base`/`rel`: an overlay's
    upper directory and lower directories as one read-only overlay (or a read-only bind of the
    only one), a bind read-only. The guest stacks its own writable layer on it. Raises MountError."""
    if len(rootfs_mounts) != 1:
        return _readonly(mount_all(rootfs_mounts, base, rel), base / rel)
    m = rootfs_mounts[0]
    if m.type != "overlay":
        return _readonly(mount_all(rootfs_mounts, base, rel), base / rel)
    layers: list[str] = []
    upper = ""
    data = []
    for opt in m.options:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            layers += value.split(":")
        elif key == "upperdir":
            upper = value
        elif key == "workdir" or opt in _FLAG_OPTIONS or opt in _IGNORED_OPTIONS:
            continue
        else:
            data.append(opt)
    layers = [upper, *layers] if upper else layers
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
                _mount(_fd_path(top), _fd_path(top), None, MS_BIND, name=str(self.dir))
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
                _mount(_fd_path(mounts.fd), _fd_path(target), None, MS_BIND, name=str(self.shared_dir))
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
            _mount(_fd_path(target), _fd_path(target), None, MS_BIND, name=str(self.dir / rel))
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
        rec = bind(source, self.mounts_dir, f"{cid}/volumes/{index}", readonly=readonly, propagation=propagation)
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
    found = {Path(mp) for _, _, mp in _mountinfo() if mp == p or mp.startswith(p + "/")}
    return sorted(found, key=lambda x: len(x.parts), reverse=True)


def unmount(target: Path) -> bool:
    """Lazily unmount `target` (not following a symlink there) and everything under it; False if
    nothing was mounted. Idempotent."""
    unmounted = False
    while True:
        rc = _libc.umount2(str(target).encode(), MNT_DETACH | UMOUNT_NOFOLLOW)
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
