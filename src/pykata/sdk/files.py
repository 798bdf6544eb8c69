"""Files inside a sandbox's container: `sandbox.files.read(...)`, `.write(...)`, `.upload(...)`.

Every operation runs a small command *in the container* (cat, stat, mkdir, rm from its userland), so a
path is resolved by the guest kernel in the container's own view (its root, its mounts, its symlinks)
with the container user's permissions: the host never resolves a guest path. Paths are passed as
arguments, never pasted into shell text. The host checks only the form of a path (a str without NUL;
relative paths are taken from the sandbox's working directory) and bounds what it accepts back.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat as _stat
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from pykata.agentapi.errors import AgentCallError, guest_text
from pykata.errors import Code, PykataError
from pykata.sandbox.datadisk import DiskFile, DiskSession
from pykata.sdk.errors import NotFoundError, PolicyDeniedError, SdkError
from pykata.sdk.process import AsyncProcess, ExecResult


class CommandRunner(Protocol):
    """What the files API needs of its sandbox (pykata.sdk.core.AsyncSandbox, which imports this
    module: naming the class here would make an import cycle)."""

    @property
    def id(self) -> str: ...

    @property
    def cwd(self) -> str: ...

    async def run(self, cmd: Sequence[str], *, stdin: bytes | None = None, max_output: int = ...) -> ExecResult: ...

    async def spawn(self, cmd: Sequence[str], *, stdin: bool = False) -> AsyncProcess: ...

    def disk_session(self) -> AbstractAsyncContextManager[DiskSession] | None: ...

Progress = Callable[[int, int], None]  # (bytes done, bytes in all; -1 when unknown)
FileType = Literal["file", "dir", "symlink", "other"]
CHUNK = 1 << 20
MAX_READ = 256 << 20  # read()/read_bytes() default cap: the guest decides how much it sends
MAX_DOWNLOAD = 4 << 30
MAX_LIST = 100_000
STDERR_WAIT = 30.0  # how long a write that failed midway waits for the command's own error
# Files at least this big move through the data disk (pykata.sandbox.datadisk) when the sandbox has
# one: its fixed cost (the disk's file swapped in and out, a copy process forked in the guest) is
# about one command's round trip, and it then moves tens of MiB/s where stdio moves a few.
DISK_MIN = 1 << 20
_NO_ID = (1 << 32) - 1  # (uid_t)-1: chown's "leave it", never an owner

_STAT_FORMAT = "%f %s %u %g %Y"
_LIST_SCRIPT = f"""cd "$1" || exit 1
for f in .* *; do
  case "$f" in .|..) continue;; esac
  [ -e "$f" ] || [ -L "$f" ] || continue
  stat -c '{_STAT_FORMAT}' -- "$f" || exit 1
  printf '%s\\0' "$f"
done"""
_WRITE_SCRIPT = ('mkdir -p "$1" && cat > "$2" && { [ -z "$3" ] || chmod "$3" "$2"; } '
                 '&& { [ -z "$4" ] || chown "$4" "$2"; }')
_EXISTS_SCRIPT = '[ -e "$1" ] || [ -L "$1" ]'
_REMOVE_SCRIPT = '[ -e "$2" ] || [ -L "$2" ] || { echo "$2: No such file or directory" >&2; exit 1; }; rm $1 -- "$2"'


@dataclass(frozen=True)
class FileInfo:
    """One entry of `list` or the answer of `stat` (a symlink is described, not followed)."""

    path: str
    type: FileType
    size: int
    mode: int  # permission bits (0o7777)
    uid: int
    gid: int
    mtime: int

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


class AsyncFiles:
    """The files API of one sandbox (its `files` attribute)."""

    def __init__(self, sandbox: CommandRunner) -> None:
        self._sb = sandbox

    def _path(self, path: str | os.PathLike[str], field: str = "path") -> str:
        p = os.fspath(path)
        if not isinstance(p, str) or not p or "\0" in p:
            raise PolicyDeniedError(f"{field}: {p!r} is not a path (a non-empty str without NUL)",
                                    sandbox_id=self._sb.id)
        return posixpath.normpath(posixpath.join(self._sb.cwd, p))

    async def _run(self, argv: list[str], *, stdin: bytes | None = None, max_output: int = MAX_READ,
                   what: str, path: str) -> ExecResult:
        r = await self._sb.run(argv, stdin=stdin, max_output=max_output)
        if r.exit_code != 0:
            raise _error(what, path, r, self._sb.id)
        return r

    async def read_bytes(self, path: str | os.PathLike[str], *, max_bytes: int = MAX_READ) -> bytes:
        """The whole file. Raises NotFoundError, PolicyDeniedError (permission), SdkError (a directory,
        more than `max_bytes`)."""
        p = self._path(path)
        disk = self._sb.disk_session()
        if disk is not None:
            out = bytearray()
            got = await self._from_disk(disk, p, max_bytes, lambda data, total: out.extend(data), None)
            if got is not None:
                return bytes(out)
        return (await self._run(["cat", "--", p], max_output=max_bytes, what="read", path=p)).stdout

    async def read(self, path: str | os.PathLike[str], *, encoding: str = "utf-8", max_bytes: int = MAX_READ) -> str:
        """The whole file as text. Raises as read_bytes."""
        return (await self.read_bytes(path, max_bytes=max_bytes)).decode(encoding)

    async def write(self, path: str | os.PathLike[str], data: bytes | str | IO[bytes], *,
                    mode: int | None = None, progress: Progress | None = None) -> None:
        """Create or replace a file (parent directories are made) with `data`: bytes, str (UTF-8) or a
        binary file object read in 1 MiB chunks. `mode` sets its permission bits. Raises
        PolicyDeniedError, SdkError."""
        p = self._path(path)
        source: IO[bytes] | bytes = data.encode() if isinstance(data, str) else data
        total = len(source) if isinstance(source, bytes) else _size_of(source)
        await self._write(p, source, total, mode, None, progress)

    async def _write(self, p: str, source: IO[bytes] | bytes, total: int, mode: int | None,
                     owner: tuple[int, int] | None, progress: Progress | None) -> None:
        if mode is not None and not 0 <= mode <= 0o7777:
            raise PolicyDeniedError(f"mode: {mode:#o} is not a permission mode", sandbox_id=self._sb.id)
        disk = self._sb.disk_session() if total < 0 or total >= DISK_MIN else None
        if disk is not None and await self._to_disk(disk, p, source, total, mode, owner, progress):
            return
        argv = ["sh", "-c", _WRITE_SCRIPT, "sh", posixpath.dirname(p) or "/", p,
                "" if mode is None else f"{mode:o}", "" if owner is None else f"{owner[0]}:{owner[1]}"]
        proc = await self._sb.spawn(argv, stdin=True)
        done = 0
        try:
            try:
                while True:
                    chunk = source[done:done + CHUNK] if isinstance(source, bytes) else source.read(CHUNK)
                    if not chunk:
                        break
                    await proc.stdin.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                await proc.stdin.close()
            except PykataError:
                # the command stopped reading (no space left, permission denied): its own error says why
                r = await proc.result(STDERR_WAIT)
                if r.exit_code != 0:
                    raise _error("write", p, r, self._sb.id) from None
                raise
            r = await proc.result()
        except BaseException:
            with contextlib.suppress(Exception):
                await proc.kill()
            raise
        if r.exit_code != 0:
            raise _error("write", p, r, self._sb.id)

    async def _to_disk(self, disk: AbstractAsyncContextManager[DiskSession], p: str, source: IO[bytes] | bytes,
                       total: int, mode: int | None, owner: tuple[int, int] | None,
                       progress: Progress | None) -> bool:
        """Write through the data disk, one piece per copy; False when the guest cannot (an older agent,
        a container crun must run, the agent policy): the caller streams instead. Raises as write."""
        done = 0
        whole = memoryview(source) if isinstance(source, bytes) else None  # pieces without copies
        async with disk as s:
            while True:
                piece = whole[done:done + s.size] if whole is not None else \
                    _read_piece(source, s.size) if not isinstance(source, bytes) else b""
                last = len(piece) < s.size
                try:
                    await s.write_file(p, piece, offset=done, create=done == 0, mode=mode if last else None,
                                       owner=owner if last else None)
                except AgentCallError as e:
                    if done == 0 and _no_disk_copy(e):
                        return False
                    raise self._disk_error("write", p, e) from None
                done += len(piece)
                if progress is not None and (piece or last):
                    progress(done, total)
                if last:
                    return True

    async def _from_disk(self, disk: AbstractAsyncContextManager[DiskSession], p: str, max_bytes: int,
                         sink: Callable[[bytes, int], object], progress: Progress | None) -> DiskFile | None:
        """Read through the data disk into `sink(data, total)`, one piece per copy; what the first copy
        found (the file's size, mode, owner: the guest's word), or None when the guest cannot (see
        _to_disk). The guest decides what it sends: more than `max_bytes` in all is refused."""
        done = 0
        first: DiskFile | None = None
        async with disk as s:
            while True:
                try:
                    info, data = await s.read_file(p, offset=done, length=s.size)
                except AgentCallError as e:
                    if done == 0 and _no_disk_copy(e):
                        return None
                    raise self._disk_error("read", p, e) from None
                if first is None:
                    first = info
                    if info.file_size > max_bytes:
                        raise SdkError(f"read {p}: more than {max_bytes} bytes ({info.file_size}, the guest says)",
                                       sandbox_id=self._sb.id)
                done += len(data)
                if done > max_bytes:
                    raise SdkError(f"read {p}: more than {max_bytes} bytes", sandbox_id=self._sb.id)
                sink(data, first.file_size)
                if progress is not None:
                    progress(done, first.file_size)
                if len(data) < s.size:
                    return first

    async def _download_disk(self, disk: AbstractAsyncContextManager[DiskSession], p: str, target: Path,
                             progress: Progress | None, preserve_owner: bool, max_bytes: int) -> bool:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                info = await self._from_disk(disk, p, max_bytes, lambda data, total: out.write(data), progress)
            if info is None:
                os.unlink(tmp)
                return False
            os.chmod(tmp, info.mode & 0o777)
            if preserve_owner:
                os.chown(tmp, info.uid, info.gid)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True

    def _disk_error(self, what: str, p: str, e: AgentCallError) -> SdkError:
        if e.code == Code.NOT_FOUND:
            return NotFoundError(f"{what} {p}: {e.message}", sandbox_id=self._sb.id)
        return _error(what, p, ExecResult(1, b"", e.message.encode()), self._sb.id)

    async def list(self, path: str | os.PathLike[str] = ".") -> list[FileInfo]:
        """The entries of a directory (not recursive), sorted by name. Raises NotFoundError, SdkError."""
        p = self._path(path)
        r = await self._run(["sh", "-c", _LIST_SCRIPT, "sh", p], what="list", path=p)
        records = r.stdout.split(b"\0")
        if len(records) > MAX_LIST + 1:
            raise SdkError(f"list {p}: more than {MAX_LIST} entries", sandbox_id=self._sb.id)
        out = []
        for rec in records[:-1]:
            header, _, raw = rec.partition(b"\n")
            name = raw.decode(errors="surrogateescape")
            # the guest writes the names: one that is not a single component ("../x", "a/b", "/etc",
            # ".") would make an entry's path name something outside the directory listed, which a
            # caller joins to a host directory to mirror it
            if name in ("", ".", "..") or "/" in name:
                raise SdkError(f"list {p}: bad entry name from the guest: {guest_text(name, 200)!r} "
                               "(not a single path component)", sandbox_id=self._sb.id)
            out.append(_parse_stat(header, posixpath.join(p, name), self._sb.id))
        return sorted(out, key=lambda f: f.path)

    async def stat(self, path: str | os.PathLike[str]) -> FileInfo:
        """Type, size, permission bits, owner and mtime. Raises NotFoundError, SdkError."""
        p = self._path(path)
        r = await self._run(["stat", "-c", _STAT_FORMAT, "--", p], max_output=4096, what="stat", path=p)
        return _parse_stat(r.stdout.strip(), p, self._sb.id)

    async def exists(self, path: str | os.PathLike[str]) -> bool:
        """True if anything (a dangling symlink too) is at `path`."""
        p = self._path(path)
        return (await self._sb.run(["sh", "-c", _EXISTS_SCRIPT, "sh", p], max_output=4096)).exit_code == 0

    async def remove(self, path: str | os.PathLike[str], *, recursive: bool = False) -> None:
        """Remove a file, a symlink, or (with `recursive`) a directory and all in it. Raises NotFoundError."""
        p = self._path(path)
        if p == "/":
            raise PolicyDeniedError("remove: refusing to remove /", sandbox_id=self._sb.id)
        await self._run(["sh", "-c", _REMOVE_SCRIPT, "sh", "-rf" if recursive else "-f", p],
                        max_output=65536, what="remove", path=p)

    async def mkdir(self, path: str | os.PathLike[str], *, parents: bool = True, mode: int | None = None) -> None:
        """Make a directory (and its parents unless `parents=False`). Raises SdkError (exists, ...)."""
        p = self._path(path)
        argv = ["mkdir", *(["-p"] if parents else []), *(["-m", f"{mode:o}"] if mode is not None else []), "--", p]
        await self._run(argv, max_output=65536, what="mkdir", path=p)

    async def upload(self, local: str | os.PathLike[str], remote: str | os.PathLike[str], *,
                     progress: Progress | None = None, preserve_owner: bool = False) -> None:
        """Copy a host file into the sandbox, streaming it in 1 MiB chunks; its permission bits (and
        with `preserve_owner` its uid:gid) are kept. Raises OSError for the local file, SdkError."""
        p = self._path(remote, "remote")
        with open(local, "rb") as f:
            st = os.fstat(f.fileno())
            if not _stat.S_ISREG(st.st_mode):
                raise PolicyDeniedError(f"local: {local} is not a regular file", sandbox_id=self._sb.id)
            owner = (st.st_uid, st.st_gid) if preserve_owner else None
            await self._write(p, f, st.st_size, _stat.S_IMODE(st.st_mode), owner, progress)

    async def download(self, remote: str | os.PathLike[str], local: str | os.PathLike[str], *,
                       progress: Progress | None = None, preserve_owner: bool = False,
                       max_bytes: int = MAX_DOWNLOAD) -> None:
        """Copy a sandbox file to the host, streaming; the local file appears whole or not at all, with
        the remote permission bits (and with `preserve_owner` its uid:gid). Raises NotFoundError,
        SdkError (more than `max_bytes`: the guest decides what it sends)."""
        p = self._path(remote, "remote")
        disk = self._sb.disk_session()
        if disk is not None and await self._download_disk(disk, p, Path(local), progress, preserve_owner, max_bytes):
            return
        info = await self.stat(p)
        if info.type != "file":
            raise SdkError(f"download {p}: a {info.type}, not a file", sandbox_id=self._sb.id)
        target = Path(local)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        proc = await self._sb.spawn(["cat", "--", p])
        done = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for stream, chunk in proc:
                    if stream != "stdout":
                        continue
                    done += len(chunk)
                    if done > max_bytes:
                        raise SdkError(f"download {p}: more than {max_bytes} bytes", sandbox_id=self._sb.id)
                    out.write(chunk)
                    if progress is not None:
                        progress(done, info.size)
            code = await proc.wait()
            if code != 0:
                raise SdkError(f"download {p}: cat exited with {code}", sandbox_id=self._sb.id)
            os.chmod(tmp, info.mode & 0o777)
            if preserve_owner:
                os.chown(tmp, info.uid, info.gid)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(Exception):
                await proc.kill()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _read_piece(f: IO[bytes], size: int) -> bytes:
    """Up to `size` bytes of `f` (fewer only at its end), read in CHUNK reads."""
    parts: list[bytes] = []
    left = size
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _no_disk_copy(e: AgentCallError) -> bool:
    """The guest cannot copy through the data disk (an older agent, a container whose processes crun
    starts, an agent policy without the RPC): stream instead."""
    return e.code == Code.UNIMPLEMENTED or (e.code == Code.PERMISSION_DENIED and "allow_rpcs" in e.message)


def _size_of(f: IO[bytes]) -> int:
    try:
        st = os.fstat(f.fileno())
        return st.st_size - f.tell() if _stat.S_ISREG(st.st_mode) else -1
    except (OSError, AttributeError, ValueError):
        return -1


def _parse_stat(header: bytes, path: str, sandbox_id: str) -> FileInfo:
    try:
        raw, size, uid, gid, mtime = header.split()
        info = FileInfo(path=path, type=_kind(int(raw, 16)), size=int(size), mode=_stat.S_IMODE(int(raw, 16)),
                        uid=int(uid), gid=int(gid), mtime=int(mtime))
        # the guest's word: ids a host chown takes (preserve_owner; never -1, "unchanged"), a size
        # and a time a host file can have
        if not (0 <= info.uid < _NO_ID and 0 <= info.gid < _NO_ID and 0 <= info.size < 1 << 63
                and -(1 << 63) <= info.mtime < 1 << 63):
            raise ValueError("out of range")
        return info
    except ValueError:
        raise SdkError(f"stat {guest_text(path, 300)}: unexpected answer {header[:80]!r}",
                       sandbox_id=sandbox_id) from None


def _kind(mode: int) -> FileType:
    if _stat.S_ISREG(mode):
        return "file"
    if _stat.S_ISDIR(mode):
        return "dir"
    if _stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _error(what: str, path: str, r: ExecResult, sandbox_id: str) -> SdkError:
    why = r.stderr.decode(errors="replace").strip().splitlines()
    message = f"{what} {path}: {guest_text(why[-1], 300) if why else f'exit status {r.exit_code}'}"
    text = message.lower()
    if "no such file" in text:
        return NotFoundError(message, sandbox_id=sandbox_id)
    if "permission denied" in text or "read-only file system" in text or "operation not permitted" in text:
        return PolicyDeniedError(message, sandbox_id=sandbox_id)
    return SdkError(message, sandbox_id=sandbox_id)
