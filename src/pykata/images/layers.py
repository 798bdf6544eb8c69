"""Apply OCI/Docker image layers to a directory, safely.

A layer is untrusted input: entries may not leave the root (absolute paths, `..`, or a path through a
symlink that points outside), whiteouts (`.wh.name`, `.wh..wh..opq`) delete what lower layers put
there, and only regular files, directories, symlinks and hard links inside the root are made.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from pykata.errors import PykataError

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


class LayerError(PykataError):
    """A layer is malformed or tries to escape the root; `member` names the bad entry."""

    def __init__(self, member: str, message: str) -> None:
        super().__init__(f"layer entry {member!r}: {message}")
        self.member = member


def _clean_parts(name: str) -> tuple[str, ...]:
    """Split a tar member name into safe components, or raise LayerError."""
    p = PurePosixPath(name)
    parts = [x for x in p.parts if x not in ("", ".", "/")]
    if any(x == ".." for x in parts):
        raise LayerError(name, "path contains '..'")
    return tuple(parts)


def _safe_dir(root: Path, parts: tuple[str, ...], member: str, create: bool = True) -> Path:
    """Walk `parts` under root without following symlinks; return the real directory."""
    cur = root
    for part in parts:
        nxt = cur / part
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(nxt, 0o755)
            cur = nxt
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise LayerError(member, f"parent {'/'.join(parts)} is not a directory inside the image")
        cur = nxt
    return cur


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def apply_layer(tar: tarfile.TarFile, root: Path) -> int:
    """Extract one layer onto `root`; returns the number of entries applied.

    Raises LayerError for an entry that is unsafe or unsupported.
    """
    count = 0
    for m in tar:
        parts = _clean_parts(m.name)
        if not parts:
            continue
        parent = _safe_dir(root, parts[:-1], m.name)
        base = parts[-1]
        if base == OPAQUE_WHITEOUT:
            for child in parent.iterdir():
                _remove(child)
            continue
        if base.startswith(WHITEOUT_PREFIX):
            _remove(parent / base[len(WHITEOUT_PREFIX):])
            continue
        target = parent / base
        if m.isdir():
            try:
                st = os.lstat(target)
                if not stat.S_ISDIR(st.st_mode):
                    _remove(target)
                    os.mkdir(target)
            except FileNotFoundError:
                os.mkdir(target)
        elif m.isreg():
            _remove(target)
            src = tar.extractfile(m)
            assert src is not None
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        elif m.issym():
            _remove(target)
            os.symlink(m.linkname, target)  # a symlink may point anywhere; we never follow it here
        elif m.islnk():
            link_parts = _clean_parts(m.linkname)
            if not link_parts:
                raise LayerError(m.name, "hard link to the root")
            source = _safe_dir(root, link_parts[:-1], m.name, create=False) / link_parts[-1]
            if os.path.islink(source) or not source.exists():
                raise LayerError(m.name, f"hard link target {m.linkname!r} is missing or a symlink")
            _remove(target)
            os.link(source, target)
        elif m.ischr() or m.isblk() or m.isfifo():
            # device nodes in images are not needed (the runtime provides /dev); skip them
            continue
        else:
            raise LayerError(m.name, f"unsupported entry type {m.type!r}")
        if not m.issym():
            os.chown(target, m.uid, m.gid, follow_symlinks=False)
            os.chmod(target, m.mode & 0o7777)
        os.utime(target, (m.mtime, m.mtime), follow_symlinks=False)
        count += 1
    return count
