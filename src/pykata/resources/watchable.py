"""A pod's kubelet-updated volumes copied into the guest (Kata's "watchable" mounts): configmap, secret,
downwardAPI and projected volumes.

Under runc a container reads such a volume from kubelet's directory, and kubelet updates it in place
(its AtomicWriter: a new `..<timestamp>` directory, then the `..data` symlink swapped to it). Shared
over 9p / virtio-fs every read is a round trip to the host; instead pykata copies the volume's tree
into a tmpfs of the guest's own when the pod's first container that mounts it is created, and keeps
the copy in step: the shim looks at the host directory (an lstat of each entry) after inotify events on
its root (RootWatch; kubelet's every update renames `..data` there) and every FULL_POLL_SECONDS, and
when anything changed sends the whole tree again (agent SyncVolume), which the agent applies in
kubelet's order (pykata.agent.volumesync), so a reader in the guest never sees half an update.

The rule (`volume_name`), for a read-only bind mount of a container of a CRI pod with uid U:
its source is exactly <kubelet root>/pods/U/volumes/kubernetes.io~{configmap,secret,downward-api,
projected}/<name>, <name> a DNS-1123 label. Anything else (a subPath, a writable mount, a deeper or
crafted path, ctr and `pykata run`, which have no pod uid) is shared from the host as before.

The host reads the tree without following anything (`scan`): directories are opened with O_NOFOLLOW
below the volume's own descriptor, a symlink is copied as a symlink (its target is text the guest
resolves in its own copy, as a container resolves it under runc), and a volume that holds a special
file (FIFO, socket, device), a hard-linked file (it may be a file from elsewhere), a mount inside it
(another file system, or a bind mount of a host directory or file from the same one: every directory
and file opened must be on the volume root's own mount), more than `max_files` regular files or
`max_bytes` bytes, directories deeper than MAX_DEPTH or a path longer than MAX_PATH is not copied: it
stays shared from the host (Unsuitable). A tree that changes while it is read (kubelet writing it, an
entry swapped mid-scan) is not copied either, but only for now (Changing: the next look takes it).
The guest only ever receives copies: it never writes where the host reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pykata.errors import PykataError
from pykata.protocols.agent import agent_pb2
from pykata.resources.emptydir import VOLUME_NAME_RE
from pykata.resources.mountapi import mount_id

WATCHABLE_PLUGINS = ("kubernetes.io~configmap", "kubernetes.io~secret", "kubernetes.io~downward-api",
                     "kubernetes.io~projected")
POLL_SECONDS = 1.0  # without inotify
# with inotify on the volumes' root directories (kubelet's every update creates, renames and removes
# entries there): a look after each burst of events, once QUIET_SECONDS passed without one, and a
# whole look every FULL_POLL_SECONDS (a change below the root made by something else than kubelet)
QUIET_SECONDS = 0.05
FULL_POLL_SECONDS = 10.0
# directories and symlinks of a kubelet volume: one `..data`, one `..<timestamp>` directory, one
# symlink per key (and directories of keys with a '/')
MAX_OTHER_ENTRIES_PER_FILE = 3
MAX_LINK = 4096
# kubelet's volumes are 2-3 levels deep (a projected item path adds its own); the scan holds a
# descriptor and a stack frame per level, and the agent takes paths of at most MAX_PATH bytes
MAX_DEPTH = 32
MAX_PATH = 4096
# what one SyncVolume may carry: the agent takes at most 3 MiB of file contents and link targets
# (agent.volumesync.MAX_BYTES), and the whole message must fit ttrpc's 4 MiB frame with its paths
MAX_SEND_DATA = 3 << 20
MAX_SEND_BYTES = (4 << 20) - (64 << 10)
# the guest tmpfs holds two versions during an update (the old and the new `..<timestamp>`)
TMPFS_SLACK = 1 << 20


class Unsuitable(PykataError):
    """The volume's tree cannot be copied into the guest (it stays shared from the host)."""


class Changing(Unsuitable):
    """The volume's tree changed while it was read (an entry removed, replaced or resized between its
    lstat and its open): not copied this time, looked at again later."""


@dataclass
class WatchedVolume:
    """One volume copied into the guest: its host directory and what was last sent."""

    name: str
    source: str
    max_files: int
    max_bytes: int
    signature: tuple[object, ...] = ()
    warned: str = field(default="")
    notified: bool = False  # its root directory is watched by inotify (RootWatch)

    @property
    def tmpfs_size(self) -> int:
        return 2 * self.max_bytes + TMPFS_SLACK


def volume_name(source: str, kubelet_root: str, uid: str) -> str | None:
    """The volume name when `source` is exactly one of pod `uid`'s configmap, secret, downwardAPI or
    projected volume directories, else None."""
    base = posixpath.join(kubelet_root.rstrip("/") or "/", "pods", uid, "volumes")
    if not source.startswith(base + "/"):
        return None
    parts = source[len(base) + 1:].split("/")
    if len(parts) != 2 or parts[0] not in WATCHABLE_PLUGINS or not VOLUME_NAME_RE.match(parts[1]):
        return None
    return parts[1]


def _open_dir(name: str, dir_fd: int | None, where: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise Changing(f"{where}: removed while read") from None
    except OSError as exc:
        if dir_fd is not None and exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Changing(f"{where}: replaced while read") from None  # lstat saw a directory
        raise Unsuitable(f"{where}: {exc.strerror}") from None


def _same_mount(fd: int, root_mnt: int, where: str) -> None:
    """`fd` must be on the volume root's mount: a bind mount of the same file system has the root's
    st_dev, so only the mount id tells it (a host directory or file bound into the volume)."""
    try:
        mnt = mount_id(fd)
    except (OSError, PykataError) as exc:
        raise Unsuitable(f"{where}: cannot tell its mount: {exc}") from None
    if mnt != root_mnt:
        raise Unsuitable(f"{where}: a mount inside the volume (another file system or a bind mount)")


def scan(source: str, max_files: int, max_bytes: int, *, read: bool = True
         ) -> tuple[list[agent_pb2.VolumeEntry], tuple[object, ...]]:
    """The tree at `source` as entries for SyncVolume (contents read when `read`) and its signature
    (type, mode, owner, size, mtime, inode and link target of each entry: what changes when kubelet
    writes). Raises Unsuitable (see the module's docstring), naming the entry; Changing when the
    tree changed while read."""
    max_entries = max_files * (1 + MAX_OTHER_ENTRIES_PER_FILE) + 8
    entries: list[agent_pb2.VolumeEntry] = []
    sig: list[object] = []
    files = total = sent_data = sent = 0
    root_fd = _open_dir(source, None, source)
    try:
        root_st = os.fstat(root_fd)
        try:
            root_mnt = mount_id(root_fd)
        except (OSError, PykataError) as exc:
            raise Unsuitable(f"{source}: cannot tell its mount: {exc}") from None

        def add(path: str, st: os.stat_result, data: bytes, link: str) -> None:
            nonlocal sent_data, sent
            sent_data += len(data) if read else len(os.fsencode(link))
            sent += len(os.fsencode(path)) + len(data) + 32
            if sent_data > MAX_SEND_DATA or sent > MAX_SEND_BYTES:
                raise Unsuitable(f"{source}: more than one agent message (file contents and link targets "
                                 f"over {MAX_SEND_DATA} bytes, or the entries over {MAX_SEND_BYTES})")
            entries.append(agent_pb2.VolumeEntry(
                path=path, mode=stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode) & 0o777, uid=st.st_uid,
                gid=st.st_gid, data=data, mtime_ns=st.st_mtime_ns))
            sig.append((path, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, link))

        def walk(rel: str, fd: int, depth: int) -> None:
            nonlocal files, total
            if depth > MAX_DEPTH:
                raise Unsuitable(f"{source}/{rel}: deeper than {MAX_DEPTH} directories")
            with os.scandir(fd) as it:
                names = []
                for entry in it:
                    names.append(entry.name)
                    if len(entries) + len(names) > max_entries:
                        raise Unsuitable(f"{source}: more than {max_entries} entries")
            for name in sorted(names):
                path = f"{rel}/{name}" if rel else name
                where = f"{source}/{path}"
                if len(os.fsencode(path)) > MAX_PATH:
                    raise Unsuitable(f"{where[:256]}...: a path longer than {MAX_PATH} bytes")
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    raise Changing(f"{where}: removed while read") from None
                if st.st_dev != root_st.st_dev:
                    raise Unsuitable(f"{where}: another file system mounted in the volume")
                if stat.S_ISDIR(st.st_mode):
                    add(path, st, b"", "")
                    sub = _open_dir(name, fd, where)
                    try:
                        now = os.fstat(sub)
                        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                            raise Changing(f"{where}: replaced while read")
                        _same_mount(sub, root_mnt, where)
                        walk(path, sub, depth + 1)
                    finally:
                        os.close(sub)
                elif stat.S_ISLNK(st.st_mode):
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except OSError as exc:  # ENOENT: gone; EINVAL: no longer a symlink
                        raise Changing(f"{where}: replaced while read ({exc.strerror})") from None
                    if not target or len(os.fsencode(target)) > MAX_LINK:
                        raise Unsuitable(f"{where}: a symlink target longer than {MAX_LINK} bytes")
                    add(path, st, os.fsencode(target), target)
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    total += st.st_size
                    if files > max_files:
                        raise Unsuitable(f"{source}: more than {max_files} files")
                    if total > max_bytes:
                        raise Unsuitable(f"{source}: more than {max_bytes} bytes")
                    if st.st_nlink == 0:  # its last name was being removed as lstat read it (kubelet's swap)
                        raise Changing(f"{where}: removed while read")
                    if st.st_nlink != 1:
                        raise Unsuitable(f"{where}: a file with {st.st_nlink} links (it may be a file from "
                                         "outside the volume)")
                    add(path, st, _read(name, fd, st, where, root_mnt) if read else b"", "")
                else:
                    raise Unsuitable(f"{where}: a special file (FIFO, socket or device)")

        add("", root_st, b"", "")
        walk("", root_fd, 1)
    finally:
        os.close(root_fd)
    return entries, tuple(sig)


def _read(name: str, dir_fd: int, st: os.stat_result, where: str, root_mnt: int) -> bytes:
    """A regular file's content, read through a descriptor that must be the inode lstat saw (no
    symlink followed, no FIFO opened: O_NONBLOCK) on the volume's own mount (a file bound over a
    key has the inode of the host file, and lstat would have seen it: the mount id tells it)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise Changing(f"{where}: removed while read") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Changing(f"{where}: replaced while read") from None
        raise Unsuitable(f"{where}: {exc.strerror}") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or now.st_ino != st.st_ino or now.st_dev != st.st_dev:
            raise Changing(f"{where}: replaced while read")
        _same_mount(fd, root_mnt, where)
        buf = bytearray()
        while len(buf) <= st.st_size:
            chunk = os.read(fd, st.st_size + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
        if len(buf) != st.st_size:
            raise Changing(f"{where}: changed size while read")
        return bytes(buf)
    finally:
        os.close(fd)


def snapshot(vol: WatchedVolume) -> tuple[list[agent_pb2.VolumeEntry], tuple[object, ...]] | None:
    """The volume's tree and signature when it held still while read (its signature the same just
    after), else None (kubelet is writing it: the next poll takes it). Raises Unsuitable."""
    try:
        entries, sig = scan(vol.source, vol.max_files, vol.max_bytes)
        _, again = scan(vol.source, vol.max_files, vol.max_bytes, read=False)
    except Changing:
        return None
    return (entries, sig) if sig == again else None


def signature(vol: WatchedVolume) -> tuple[object, ...]:
    """The volume's signature only (lstat of each entry, nothing read). Raises Unsuitable."""
    return scan(vol.source, vol.max_files, vol.max_bytes, read=False)[1]


IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)


# inotify instances are counted per user (fs.inotify.max_user_instances, 128 on Debian) and root's are
# shared with kubelet, containerd and systemd; nearly every pod has a projected volume (its service
# account token), so one instance per pod's shim would take them all on a node of ~128 pods and break
# their watches. pykata's shims take at most this share of the limit; the other pods poll each second.
INOTIFY_SHARE = 4


def _max_user_instances() -> int:
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    except (OSError, ValueError):
        return 128


def _take_slot(slots_dir: Path) -> int:
    """A descriptor holding one of pykata's inotify slots (an flock on `slots_dir`/<n>, released when
    this process ends). Raises OSError when all of them are held."""
    limit = max(1, _max_user_instances() // INOTIFY_SHARE)
    slots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for i in range(limit):
        fd = os.open(slots_dir / str(i), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return fd
    raise OSError(errno.EMFILE, f"pykata's {limit} inotify instances (1/{INOTIFY_SHARE} of "
                                "fs.inotify.max_user_instances, shared with kubelet and containerd) are in use")


def max_user_instances() -> int:
    """fs.inotify.max_user_instances (128 when unreadable)."""
    return _max_user_instances()


def slots_in_use(slots_dir: Path) -> tuple[int, int]:
    """(how many of pykata's inotify slots under `slots_dir` live shims hold, how many there are). A slot
    is probed with a non-blocking flock, released at once. Never raises (an unreadable directory counts
    as no slot in use)."""
    limit = max(1, _max_user_instances() // INOTIFY_SHARE)
    held = 0
    for i in range(limit):
        try:
            fd = os.open(slots_dir / str(i), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # never taken yet
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            held += 1
        finally:
            os.close(fd)
    return held, limit


class RootWatch:
    """An inotify descriptor watching volumes' root directories: readable when something changed there
    (the events themselves are not parsed: any of them means "look again"). With `slots_dir`, it
    first takes one of the host's INOTIFY_SHARE slots there (_take_slot). Raises OSError."""

    def __init__(self, slots_dir: Path | None = None) -> None:
        self._slot = _take_slot(slots_dir) if slots_dir is not None else -1
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            if self._slot >= 0:
                os.close(self._slot)
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add(self, path: str) -> None:
        """Watch directory `path` (not followed if it is a symlink). Raises OSError."""
        if self._libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")

    def drain(self) -> None:
        """Read (and drop) what is queued."""
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._slot >= 0:
            os.close(self._slot)
            self._slot = -1
