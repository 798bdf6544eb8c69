"""Apply OCI/Docker image layers to a directory, safely.

A layer is untrusted input. Every file operation is made relative to a directory file descriptor
reached from the root with openat2(RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH), or one component at a time with
O_NOFOLLOW where the kernel lacks it (what runc's securejoin and containerd's fs.RootPath guarantee,
without their resolving): nothing is ever created, changed or removed outside the root. Rules, each
refused with a `LayerError` naming the entry:
  * `..` anywhere in a name or a hard link target; NUL bytes; a component longer than 255 bytes.
    Absolute names are taken relative to the root, as Docker, containerd and GNU tar do.
  * An entry below a symlink (`lib -> /etc`, then `lib/passwd`), at any depth, and so any chain of
    symlinks: image builders write real paths, so we refuse instead of resolving. Symlinks themselves
    may point anywhere; they are never followed here.
  * Hard links must name an existing non-directory inside the root (reached the same way).
  * Device nodes: refused. A node in the rootfs is a host device node (the rootfs is shared with the
    guest and lives in the host's cache); the runtime gives containers their /dev.
  * Whiteouts as in the OCI image spec (layer.md): `.wh.<name>` removes <name> of lower layers in the
    same directory, `.wh..wh..opq` hides everything lower layers put in its directory; whiteouts naming
    ``, `.`, `..`, other `.wh..wh.` names, and `.wh.` directories are refused.
  * Sparse files, and pax/GNU header records beyond the caps (Python's tarfile reads those whole and
    recurses once per record).
Owners, modes (setuid/setgid included, as containerd keeps them; chown first, which would clear them)
and mtimes come from the entries; the cache directory is 0700 so host users cannot reach setuid files.
Caps (`[image]` in configuration.toml) are charged on a `Budget` shared by all layers of an image.
"""

from __future__ import annotations

import ctypes
import math
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pykata.config.schema import ImageSection
from pykata.images.blobs import CHUNK, Budget, CountingReader, Readable, decompressed
from pykata.images.errors import BlobError, ImageError, ImageLimitError, LayerError
from pykata.images.tarheaders import checked_tarinfo

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
NAME_MAX = 255
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# openat2(2), Linux >= 5.6: one call resolves a whole path below a directory, refusing symlinks and `..`
# out of it. The number is the same on every architecture (it came after the syscall tables merged).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08

Parts = tuple[str, ...]


@dataclass(frozen=True)
class LayerStats:
    """What applying one layer did: entries read, uncompressed bytes and their sha256 (the diff_id)."""

    entries: int
    size: int
    diff_id: str


def apply_layer(blob: Readable, root: Path, limits: ImageSection | None = None, *,
                budget: Budget | None = None, diff_id: str | None = None) -> LayerStats:
    """Extract one layer (a tar stream: plain, gzip, bzip2 or xz) onto the directory `root`.

    `budget` carries the caps across the layers of one image (a fresh one from `limits` otherwise);
    `diff_id`, when given, is the sha256 the uncompressed stream must have.

    Raises:
        LayerError: an entry is unsafe, malformed or unsupported (`member` names it).
        ImageLimitError: a cap is exceeded (`limit` names its configuration key).
        BlobError: the uncompressed stream does not match `diff_id`.
        ImageError: the stream is not a (compressed) tar archive.
    On error, what was already extracted stays in `root`: the caller removes it.
    """
    limits = limits or ImageSection()
    budget = budget or Budget(limits)
    try:
        source = decompressed(blob)
    except ImageError:
        raise
    except (OSError, EOFError, ValueError) as e:
        raise ImageError("", f"the layer cannot be read: {e}") from None
    stream = CountingReader(source, budget)
    info_class = checked_tarinfo(limits)
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        applier = _Applier(root_fd, limits, budget)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=info_class)  # type: ignore[call-overload]  # noqa: SIM115
        except tarfile.TarError as e:
            raise ImageError("", f"the layer is not a tar archive: {e}") from None
        entries, last = 0, ""
        with tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as e:
                    raise ImageError("", f"the layer's tar stream is corrupt after entry {last[:200]!r}: "
                                         f"{e}") from None
                if member is None:
                    break
                tar.members.clear()  # stream mode keeps every member otherwise
                applier.apply(tar, member)
                entries, last = entries + 1, member.name
        stream.drain()
    finally:
        os.close(root_fd)
    if diff_id is not None and stream.diff_id != diff_id:
        raise BlobError(diff_id, f"the uncompressed layer has digest {stream.diff_id} instead "
                                 "(rootfs.diff_ids of the image config)")
    return LayerStats(entries, stream.count, stream.diff_id)


class _Applier:
    """Applies the entries of one layer below a root directory file descriptor."""

    def __init__(self, root_fd: int, limits: ImageSection, budget: Budget) -> None:
        self.root_fd = root_fd
        self.limits = limits
        self.budget = budget
        self.chown = os.geteuid() == 0
        # Every path this layer wrote and their parents: whiteouts only hide lower layers' entries.
        # Paths are interned as ints ((parent id, name) -> id; the root is 0): sets of tuples of every
        # prefix would cost depth² per entry.
        self.path_ids: dict[tuple[int, str], int] = {}
        self.touched: set[int] = set()

    def apply(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.budget.charge_entry()
        if m.isreg() or m.type not in tarfile.SUPPORTED_TYPES:
            self.budget.check_size(m.name, m.size)  # before tarfile skips (reads) that many bytes
        try:
            parts = self._parts(m.name, m.name)
            if not parts:
                return  # the root itself: its mode stays ours
            if parts[-1].startswith(WHITEOUT_PREFIX):
                self._whiteout(parts, m.name)
                return
            if m.ischr() or m.isblk():
                kind = "character" if m.ischr() else "block"
                raise LayerError(m.name, f"{kind} device node {m.devmajor}:{m.devminor} refused: a device "
                                         "node in the image would be a host device node; the runtime "
                                         "provides /dev")
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
                raise LayerError(m.name, f"unsupported entry type {m.type!r}")
            uid, gid = self._owner(m)
            pfd = self._parent(parts, m.name, create=True)
            assert pfd is not None
            try:
                base = parts[-1]
                if m.isdir():
                    self._dir(pfd, base, m, uid, gid)
                elif m.isreg():
                    self._file(pfd, base, tar, m, uid, gid)
                elif m.issym():
                    self._symlink(pfd, base, m, uid, gid)
                elif m.islnk():
                    self._hardlink(pfd, base, parts, m)
                else:
                    self._fifo(pfd, base, m, uid, gid)
            finally:
                os.close(pfd)
            pid = 0
            for part in parts:
                pid = self.path_ids.setdefault((pid, part), len(self.path_ids) + 1)
                self.touched.add(pid)
        except ImageError:
            raise
        except tarfile.TarError as e:
            raise LayerError(m.name, f"its data is truncated or corrupt: {e}") from None
        except (OSError, ValueError, OverflowError) as e:
            detail = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
            raise LayerError(m.name, f"cannot be created: {detail}") from None

    # ---- names --------------------------------------------------------------------------------------

    def _parts(self, name: str, member: str) -> Parts:
        """The components of an entry name (or hard link target), checked; () is the root."""
        if "\0" in name:
            raise LayerError(member, "NUL byte in a name")
        try:
            length = len(os.fsencode(name))
        except UnicodeError:
            raise LayerError(member, "a name that cannot be encoded") from None
        if length > self.limits.max_path_length:
            raise ImageLimitError("image.max_path_length", self.limits.max_path_length,
                                  f"entry {member[:200]!r}: a path of {length} bytes")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise LayerError(member, f"the path {name[:200]!r} contains '..'")
        for p in parts:
            if len(p) > NAME_MAX // 4 and len(os.fsencode(p)) > NAME_MAX:  # 4 bytes a character at most
                raise LayerError(member, f"a name component is longer than {NAME_MAX} bytes")
        if any(p.startswith(WHITEOUT_PREFIX) for p in parts[:-1]):
            raise LayerError(member, f"a directory name starts with the whiteout prefix {WHITEOUT_PREFIX!r}")
        return parts

    def _owner(self, m: tarfile.TarInfo) -> tuple[int, int]:
        for what, value in (("uid", m.uid), ("gid", m.gid)):
            if not 0 <= value <= MAX_ID:
                raise LayerError(m.name, f"{what} {value} is out of range")
        return m.uid, m.gid

    def _parent(self, parts: Parts, member: str, *, create: bool) -> int | None:
        """A descriptor of the directory holding parts[-1], reached without following symlinks.

        Missing directories are made (0755, each charged as an entry) when `create`, else None is
        returned. One openat2(RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH) call when the kernel has it (a deep
        path would otherwise cost one open per component, for every entry), else a walk.
        """
        if len(parts) > 1 and _OPENAT2 is not None:
            try:
                return _OPENAT2(self.root_fd, "/".join(parts[:-1]))
            except OSError:
                pass  # missing, a symlink, not a directory: the walk makes it or says which
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts[:-1]):
                nfd = self._step(fd, part, parts[:i + 1], member, create)
                if nfd is None:
                    return None
                os.close(fd)
                fd = nfd
            found, fd = fd, -1
            return found
        finally:
            if fd >= 0:
                os.close(fd)

    def _step(self, fd: int, part: str, where: Parts, member: str, create: bool) -> int | None:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as e:
            try:
                is_link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            name = "/".join(where)[:200]
            if is_link:
                raise LayerError(member, f"{name!r} is a symlink: entries are never written through "
                                         "symlinks") from None
            raise LayerError(member, f"{name!r} is not a directory ({e.strerror})") from None
        self.budget.charge_entry()  # an implied directory is an inode like any entry
        os.mkdir(part, 0o755, dir_fd=fd)
        nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        os.fchmod(nfd, 0o755)  # whatever the umask: containers' users must traverse it
        return nfd

    # ---- entries ------------------------------------------------------------------------------------

    def _metadata(self, fd: int, m: tarfile.TarInfo, uid: int, gid: int) -> None:
        if self.chown:
            os.fchown(fd, uid, gid)  # before chmod: chown clears setuid/setgid
        os.fchmod(fd, m.mode & 0o7777)
        os.utime(fd, ns=(_mtime_ns(m), _mtime_ns(m)))

    def _dir(self, pfd: int, base: str, m: tarfile.TarInfo, uid: int, gid: int) -> None:
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                remove_entry(pfd, base)
                os.mkdir(base, 0o700, dir_fd=pfd)
        except FileNotFoundError:
            os.mkdir(base, 0o700, dir_fd=pfd)
        dfd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            self._metadata(dfd, m, uid, gid)
        finally:
            os.close(dfd)

    def _file(self, pfd: int, base: str, tar: tarfile.TarFile, m: tarfile.TarInfo, uid: int, gid: int) -> None:
        self.budget.check_free_space(pfd, m.size)
        remove_entry(pfd, base)  # never write through what was there (a hard link, a symlink)
        src = tar.extractfile(m)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=pfd)
        try:
            if src is not None:
                while chunk := src.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            self._metadata(fd, m, uid, gid)
        finally:
            os.close(fd)

    def _symlink(self, pfd: int, base: str, m: tarfile.TarInfo, uid: int, gid: int) -> None:
        self._check_link_name(m)
        remove_entry(pfd, base)
        os.symlink(m.linkname, base, dir_fd=pfd)
        if self.chown:
            os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(base, ns=(_mtime_ns(m), _mtime_ns(m)), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, pfd: int, base: str, parts: Parts, m: tarfile.TarInfo) -> None:
        self._check_link_name(m)
        target = self._parts(m.linkname, m.name)
        if not target:
            raise LayerError(m.name, "a hard link to the root directory")
        if target == parts:
            return  # a link to itself: nothing to do
        tfd = self._parent(target, m.name, create=False)
        if tfd is None:
            raise LayerError(m.name, f"hard link target {m.linkname[:200]!r} does not exist in the image")
        try:
            try:
                st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(m.name, f"hard link target {m.linkname[:200]!r} does not exist in the "
                                         "image") from None
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(m.name, f"hard link target {m.linkname[:200]!r} is a directory")
            remove_entry(pfd, base)
            os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _fifo(self, pfd: int, base: str, m: tarfile.TarInfo, uid: int, gid: int) -> None:
        remove_entry(pfd, base)
        os.mkfifo(base, 0o600, dir_fd=pfd)
        if self.chown:
            os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(base, m.mode & 0o7777, dir_fd=pfd)  # we just made it: no one could swap in a symlink
        os.utime(base, ns=(_mtime_ns(m), _mtime_ns(m)), dir_fd=pfd, follow_symlinks=False)

    def _check_link_name(self, m: tarfile.TarInfo) -> None:
        if "\0" in m.linkname:
            raise LayerError(m.name, "NUL byte in the link target")
        if len(os.fsencode(m.linkname)) > self.limits.max_path_length:
            raise ImageLimitError("image.max_path_length", self.limits.max_path_length,
                                  f"entry {m.name[:200]!r}: a link target of {len(os.fsencode(m.linkname))} "
                                  "bytes")

    # ---- whiteouts ----------------------------------------------------------------------------------

    def _whiteout(self, parts: Parts, member: str) -> None:
        base = parts[-1]
        target = ""
        if base != OPAQUE_WHITEOUT:
            if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                raise LayerError(member, "unknown special whiteout (the OCI spec defines only "
                                         f"{OPAQUE_WHITEOUT!r})")
            target = base[len(WHITEOUT_PREFIX):]
            if target in ("", ".", ".."):
                raise LayerError(member, f"a whiteout must name an entry of its directory, not {target!r}")
        pfd = self._parent(parts, member, create=False)
        if pfd is None:
            return  # its directory does not exist: nothing to hide
        try:
            if not target:
                self._opaque(pfd, parts[:-1])
                return
            path = (*parts[:-1], target)
            if self._path_id(path) not in self.touched:
                remove_entry(pfd, target)
                return
            # this layer wrote it: keep that, hide only what lower layers have below it
            try:
                st = os.stat(target, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                dfd = os.open(target, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self._opaque(dfd, path)
                finally:
                    os.close(dfd)
        finally:
            os.close(pfd)

    def _path_id(self, parts: Parts) -> int | None:
        pid = 0
        for part in parts:
            found = self.path_ids.get((pid, part))
            if found is None:
                return None
            pid = found
        return pid

    def _opaque(self, dfd: int, dir_parts: Parts) -> None:
        """Remove what lower layers put below a directory (walked iteratively: trees may be deep)."""
        todo: list[tuple[Parts, int | None]] = [(dir_parts, self._path_id(dir_parts))]
        first = True
        while todo:
            here, here_id = todo.pop()
            if first:
                fd, first = os.dup(dfd), False
            else:
                pfd = self._parent(here, "/".join(here), create=False)
                if pfd is None:
                    continue
                try:
                    fd = os.open(here[-1], _DIR_FLAGS, dir_fd=pfd)
                finally:
                    os.close(pfd)
            try:
                for name in os.listdir(fd):
                    child_id = None if here_id is None else self.path_ids.get((here_id, name))
                    if child_id not in self.touched:
                        remove_entry(fd, name)
                    elif stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        todo.append(((*here, name), child_id))
            finally:
                os.close(fd)


def remove_entry(pfd: int, name: str) -> None:
    """Remove `name` in the directory `pfd`, a whole tree if it is one, following no symlinks.

    Iterative and with one directory open at a time, so any depth works (shutil.rmtree recurses).
    Walks up with "..", which is right only where no one else moves directories (our own staging).
    """
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return
    stack = [name]
    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        while True:
            sub = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                nfd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
                stack.append(sub)
                continue
            done = stack.pop()
            if not stack:
                os.rmdir(done, dir_fd=pfd)
                return
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a directory tree we made (a staging directory), whatever an image put in it."""
    parent = os.open(path.parent, _DIR_FLAGS)
    try:
        remove_entry(parent, path.name)
    finally:
        os.close(parent)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_openat2() -> Callable[[int, str], int] | None:
    """openat2 for directories below a descriptor, or None where the kernel (or seccomp) lacks it."""
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    how = _OpenHow(_DIR_FLAGS, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)

    def openat2(dir_fd: int, path: str) -> int:
        fd = int(syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dir_fd), os.fsencode(path),
                         ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return fd

    try:
        root = os.open("/", _DIR_FLAGS)
        try:
            os.close(openat2(root, "."))
        finally:
            os.close(root)
    except OSError:
        return None
    return openat2


_OPENAT2 = _load_openat2()


def _mtime_ns(m: tarfile.TarInfo) -> int:
    t = m.mtime
    if not isinstance(t, int | float) or not math.isfinite(t) or abs(t) > 2**40:
        return 0
    return int(t * 1_000_000_000)
