"""A pod volume the host copies into the guest and keeps in step (SyncVolume): kubelet's configmap,
secret, downwardAPI and projected volumes, as Kata's "watchable" mounts.

kubelet writes such a volume atomically (its AtomicWriter): the files of a version go into a new hidden
directory `..<timestamp>`, the symlink `..data` is swapped to it by a rename, the user-visible names are
symlinks through `..data` (`key -> ..data/key`), and the old version's directory goes last. The host
sends the whole tree at each change; `apply` makes the guest's copy that tree in the same order: new
directories, then regular files (each written aside and renamed into place), then symlinks (`..`-names
first, each made aside and renamed over the old one), then what is gone, deepest first. So a reader
sees the old set or the new one, never a mix, as under runc.

The tree is the agent's own (a tmpfs in <state>/emptydir that containers get read-only): every
operation goes through directory descriptors opened without following symlinks.

A volume's first tree goes into the tmpfs its call just mounted, which no container binds yet: nobody
can see it half made, so its entries are made in place (`fresh`), without the scan, the aside copies
and the renames an update needs. Nothing is ever synced to disk: the tmpfs is in guest memory and dies
with the VM, and the host sends the whole tree again after any failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from pykata.agent.validation import MAX_PATH, open_dir_below
from pykata.errors import InvalidArgument
from pykata.protocols.agent import agent_pb2

MAX_ENTRIES = 4096
MAX_BYTES = 3 << 20  # below ttrpc's 4 MiB message bound
MAX_TMPFS = 16 << 20  # a volume's tmpfs in guest memory (room for two versions during an update)
# A tree this small is applied in the agent's loop thread, without a hand-off to a worker thread (a few
# ms under TCG): containerd's /etc files of a CRI pod, a small configmap. Writing it to a tmpfs blocks
# the loop for well under what the hand-off costs.
INLINE_ENTRIES = 64
INLINE_BYTES = 256 << 10
KINDS = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK)
PART_PREFIX = ".pykata-sync."


def check_entries(entries: Sequence[agent_pb2.VolumeEntry]) -> dict[str, agent_pb2.VolumeEntry]:
    """The entries by path, checked: at most MAX_ENTRIES and MAX_BYTES, paths relative without '.',
    '..', empty components or NUL, each one's parent a directory of the set, the root ("") a directory,
    only permission bits, symlink targets 1-4096 bytes. Raises InvalidArgument naming the entry."""
    if len(entries) > MAX_ENTRIES:
        raise InvalidArgument("entries", f"{len(entries)} entries, at most {MAX_ENTRIES}")
    total = 0
    tree: dict[str, agent_pb2.VolumeEntry] = {}
    for i, e in enumerate(entries):
        field = f"entries[{i}]"
        if len(e.path) > MAX_PATH or "\0" in e.path:
            raise InvalidArgument(f"{field}.path", "longer than 4096 characters or contains NUL")
        if e.path and any(p in ("", ".", "..") or p.startswith(PART_PREFIX) for p in e.path.split("/")):
            raise InvalidArgument(f"{field}.path", f"{e.path[:256]!r} is not a plain relative path")
        kind = stat.S_IFMT(e.mode)
        if kind not in KINDS or e.mode & ~(kind | 0o777):
            raise InvalidArgument(f"{field}.mode", f"{e.mode:o}: a directory, regular file or symlink with "
                                                   "permission bits only")
        if kind == stat.S_IFLNK and (not e.data or len(e.data) > MAX_PATH or b"\0" in e.data):
            raise InvalidArgument(f"{field}.data", "a symlink target must be 1-4096 bytes without NUL")
        if kind == stat.S_IFDIR and e.data:
            raise InvalidArgument(f"{field}.data", "a directory has no data")
        total += len(e.data)
        if total > MAX_BYTES:
            raise InvalidArgument("entries", f"more than {MAX_BYTES} bytes")
        if e.path in tree:
            raise InvalidArgument(f"{field}.path", f"{e.path[:256]!r} is given twice")
        tree[e.path] = e
    root = tree.get("")
    if root is None or stat.S_IFMT(root.mode) != stat.S_IFDIR:
        raise InvalidArgument("entries", "the root (path \"\") must be given, as a directory")
    for path in tree:
        if path:
            parent = path.rpartition("/")[0]
            if parent not in tree or stat.S_IFMT(tree[parent].mode) != stat.S_IFDIR:
                raise InvalidArgument("entries", f"{path[:256]!r} has no parent directory in the set")
    return tree


def small(tree: dict[str, agent_pb2.VolumeEntry]) -> bool:
    """Whether `tree` (check_entries' result) is small enough to apply in the agent's loop thread."""
    return len(tree) <= INLINE_ENTRIES and sum(len(e.data) for e in tree.values()) <= INLINE_BYTES


def _scan(root: Path) -> dict[str, os.stat_result]:
    """The guest copy as it is: path -> lstat, never following a symlink."""
    found: dict[str, os.stat_result] = {}

    def walk(rel: str, fd: int) -> None:
        with os.scandir(fd) as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                found[path] = st
                if stat.S_ISDIR(st.st_mode):
                    sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        walk(path, sub)
                    finally:
                        os.close(sub)

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        walk("", fd)
    finally:
        os.close(fd)
    return found


def _same_file(dir_fd: int, name: str, st: os.stat_result, e: agent_pb2.VolumeEntry) -> bool:
    if not stat.S_ISREG(st.st_mode) or st.st_size != len(e.data) or stat.S_IMODE(st.st_mode) != e.mode & 0o777:
        return False
    if (st.st_uid, st.st_gid) != (e.uid, e.gid):
        return False
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(len(e.data) + 1) == e.data
    finally:
        os.close(fd)


def _clear(dir_fd: int, name: str, st: os.stat_result | None) -> None:
    """Remove what is at `name` when it is a directory that a file or symlink replaces."""
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)


def apply(root: Path, tree: dict[str, agent_pb2.VolumeEntry],
          previous: dict[str, agent_pb2.VolumeEntry] | None = None, *, fresh: bool = False) -> int:
    """Make the tree at `root` (an existing directory) `tree` (check_entries' result), in kubelet's
    order; returns how many entries were written or removed. `fresh`: `root` is empty, already has the
    tree root's mode and owner (a tmpfs mounted with them) and nobody sees it yet, so each entry is
    made in place (no scan of the copy, no aside copy or rename). All or nothing, as kubelet's AtomicWriter:
    when a step fails (a file over the tmpfs's room, any error), the tree is put back as `previous` (the
    last tree applied; None: empty) before the error is raised, so neither half of this update nor its
    leftovers stay (they used to, until an update that could be applied came: never, when the next one
    was too big to copy). Raises OSError or InvalidArgument (the step's; a failed rollback's is chained to
    it)."""
    try:
        return _apply(root, tree, fresh)
    except (OSError, InvalidArgument) as exc:
        before = previous if previous is not None else {"": tree[""]}
        try:
            try:
                # in kubelet's order, so the volume always shows a whole tree: the old `..<timestamp>`
                # back and `..data` pointing at it before this update's leftovers go
                _apply(root, before)
            except OSError:
                # what this update wrote takes the room the old tree needs: remove it first
                _remove_extra(root, before)
                _apply(root, before)
            _remove_extra(root, before)
        except OSError as again:
            raise exc from again
        raise


def _remove_extra(root: Path, keep: dict[str, agent_pb2.VolumeEntry]) -> None:
    """Remove what is at `root` and not in `keep` (or of another type there), deepest first."""
    current = _scan(root)
    fds: dict[str, int] = {}
    try:
        for path in sorted(current, key=lambda p: -p.count("/")):
            e = keep.get(path)
            if e is not None and stat.S_IFMT(e.mode) == stat.S_IFMT(current[path].st_mode):
                continue
            parent, _, name = path.rpartition("/")
            if parent not in fds:
                try:
                    fds[parent] = open_dir_below(root, [p for p in parent.split("/") if p], field="path")
                except (OSError, InvalidArgument):
                    continue  # removed with a directory above it
            if stat.S_ISDIR(current[path].st_mode):
                shutil.rmtree(name, dir_fd=fds[parent])
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fds[parent])
    finally:
        for fd in fds.values():
            os.close(fd)


def _apply(root: Path, tree: dict[str, agent_pb2.VolumeEntry], fresh: bool = False) -> int:
    """_apply_steps; an OSError says which step on which path failed (a failed update is rolled back,
    and the host logs only this message: it is all there is to tell why)."""
    doing = ["reading the copy"]
    try:
        return _apply_steps(root, tree, doing, fresh)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc} ({doing[0]})") from exc


def _apply_steps(root: Path, tree: dict[str, agent_pb2.VolumeEntry], doing: list[str], fresh: bool) -> int:
    current = {} if fresh else _scan(root)
    changes = 0
    fds: dict[str, int] = {}

    def parent_fd(path: str) -> tuple[int, str]:
        parent, _, name = path.rpartition("/")
        if parent not in fds:
            fds[parent] = open_dir_below(root, [p for p in parent.split("/") if p], field="path")
        return fds[parent], name

    try:
        doing[0] = "the root's mode and owner"
        top = tree[""]
        rfd, _ = parent_fd("x")
        if not fresh:
            os.chmod(f"/proc/self/fd/{rfd}", top.mode & 0o777)
            os.chown(f"/proc/self/fd/{rfd}", top.uid, top.gid)
        items = sorted(((p, e) for p, e in tree.items() if p), key=lambda pe: pe[0].count("/"))
        # 1. directories, parents first
        for path, e in items:
            if stat.S_IFMT(e.mode) != stat.S_IFDIR:
                continue
            doing[0] = f"directory {path[:256]!r}"
            fd, name = parent_fd(path)
            st = current.get(path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
                st = None
            if st is None:
                os.mkdir(name, 0o700, dir_fd=fd)
                changes += 1
            if st is None or stat.S_IMODE(st.st_mode) != e.mode & 0o777 or (st.st_uid, st.st_gid) != (e.uid, e.gid):
                os.chmod(name, e.mode & 0o777, dir_fd=fd, follow_symlinks=False)
                os.chown(name, e.uid, e.gid, dir_fd=fd, follow_symlinks=False)
        # 2. regular files, each written aside and renamed into place
        for path, e in items:
            if stat.S_IFMT(e.mode) != stat.S_IFREG:
                continue
            doing[0] = f"file {path[:256]!r}"
            fd, name = parent_fd(path)
            st = current.get(path)
            if st is not None and _same_file(fd, name, st, e):
                continue
            part = name if fresh else PART_PREFIX + name
            if not fresh:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part, dir_fd=fd)
            out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
            try:
                view = memoryview(e.data)
                while view:
                    view = view[os.write(out, view):]
                os.fchmod(out, e.mode & 0o777)
                os.fchown(out, e.uid, e.gid)
                if e.mtime_ns > 0:
                    os.utime(out, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(out)
            if not fresh:
                _clear(fd, name, st)
                os.rename(part, name, src_dir_fd=fd, dst_dir_fd=fd)
            changes += 1
        # 3. symlinks: kubelet's `..data` (and any `..` name) before the names that point through it
        links = [(p, e) for p, e in items if stat.S_IFMT(e.mode) == stat.S_IFLNK]
        links.sort(key=lambda pe: (not pe[0].rpartition("/")[2].startswith(".."), pe[0].count("/")))
        for path, e in links:
            doing[0] = f"symlink {path[:256]!r}"
            fd, name = parent_fd(path)
            st = current.get(path)
            target = os.fsdecode(e.data)
            if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=fd) == target:
                continue
            if fresh:
                os.symlink(target, name, dir_fd=fd)
                os.chown(name, e.uid, e.gid, dir_fd=fd, follow_symlinks=False)
                changes += 1
                continue
            part = PART_PREFIX + name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part, dir_fd=fd)
            os.symlink(target, part, dir_fd=fd)
            os.chown(part, e.uid, e.gid, dir_fd=fd, follow_symlinks=False)
            _clear(fd, name, st)
            os.rename(part, name, src_dir_fd=fd, dst_dir_fd=fd)
            changes += 1
        # 4. what is gone, deepest first
        for path in sorted((p for p in current if p not in tree), key=lambda p: -p.count("/")):
            parent = path.rpartition("/")[0]
            if parent and (parent not in tree or stat.S_IFMT(tree[parent].mode) != stat.S_IFDIR):
                continue  # removed with its directory
            doing[0] = f"removing {path[:256]!r}"
            fd, name = parent_fd(path)
            if stat.S_ISDIR(current[path].st_mode):
                shutil.rmtree(name, dir_fd=fd)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
            changes += 1
    finally:
        for fd in fds.values():
            os.close(fd)
    return changes
