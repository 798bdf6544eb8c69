"""The snapshot directory of pykata.sandbox.snapshot: its format, hashing, and opening one for a restore.

    <snapshot>/                 0700, made under a temporary name and renamed when complete
      manifest.json             0600: what the snapshot needs (format FORMAT)
      state                     0600: QEMU's migration stream, RAM included

open_snapshot() checks the manifest's shape and bounds (what it says is compared with the host by
pykata.sandbox.snapshot) and opens the state, both inside the directory without following a symlink:
a snapshot is as trusted as the user who made it, but never a way to make the host read elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata import ids
from pykata.errors import PykataError
from pykata.fsutil import atomic_write

FORMAT = 1
KIND = "pykata-sandbox-snapshot"
MANIFEST = "manifest.json"
STATE = "state"
MAX_MANIFEST = 1 << 20
MAX_CONTAINERS = 64
# the stream carries at most the guest's RAM, plus device state and page headers
STREAM_SLACK = 64 << 20
HASH_CHUNK = 4 << 20
# what must be equal between the saved machine and the one restoring it (template_inputs' keys)
MACHINE_KEYS = ("machine_type", "default_memory", "default_vcpus", "maxvcpus", "memory_slots", "maxmemory",
                "cpu_model", "cpu", "accel", "kernel_params", "entropy_source", "shared_fs", "agent_channel",
                "root_slots", "root_slot_mib", "data_disk_mib", "balloon")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")  # pykata.resources.rootimage keys (no '.', no '/')


class SnapshotError(PykataError):
    """A snapshot cannot be made or restored; `field` names the manifest field (or file) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"snapshot: {field}: {message}" if field else f"snapshot: {message}")
        self.field = field


_digests: dict[tuple[int, int, int, int, int], str] = {}
# A file's change time comes from the kernel's coarse clock: a write within the same tick (1-10 ms) as
# the last one may leave it unchanged. A digest is remembered only for a file unchanged this long.
SETTLED_S = 0.03
MAX_KNOWN_DIGESTS = 1024


def _file_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    # the change time: any write, truncate or chmod moves it, and no user can set it back (mtime can be)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(fd: int) -> str:
    """sha256 of an open file, remembered per (device, inode, size, mtime, ctime) for this process."""
    st = os.fstat(fd)
    key = _file_key(st)
    if key in _digests:
        return _digests[key]
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, HASH_CHUNK, offset)
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    _digests[key] = h.hexdigest()
    return _digests[key]


class GrowingFileHash:
    """sha256 of a file another process appends to (QEMU writing the stream), computed in a thread
    while it grows, so hashing overlaps the save instead of following it: `finish()` once the writer
    is done returns the digest and the size."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._done = threading.Event()
        self._hash = hashlib.sha256()
        self._offset = 0
        self._thread = threading.Thread(target=self._run, name="snapshot-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            finished = self._done.is_set()  # read before the last pass: nothing is written after it
            chunk = os.pread(self._fd, HASH_CHUNK, self._offset)
            if chunk:
                self._hash.update(chunk)
                self._offset += len(chunk)
            elif finished:
                return
            else:
                self._done.wait(0.002)

    async def finish(self) -> tuple[str, int]:
        self._done.set()
        await asyncio.to_thread(self._thread.join)
        return self._hash.hexdigest(), self._offset


class KnownDigests:
    """The sha256 of snapshot states this host hashed itself (when it saved them, or at a verified
    restore), by file identity: (device, inode, size, mtime, ctime). A restore of such a state skips
    hashing it again (~0.4 s of CPU for a 186 MiB stream): the file cannot have changed without its
    ctime moving. One small file per state under `<runtime_dir>/snapshot-digests` (root's; gone at
    reboot), at most MAX_KNOWN_DIGESTS (the oldest go). Never raises: a record that cannot be read or
    written means hashing again."""

    def __init__(self, runtime_dir: Path) -> None:
        self.dir = runtime_dir / "snapshot-digests"

    def _path(self, st: os.stat_result) -> Path:
        return self.dir / f"{st.st_dev}-{st.st_ino}"

    def get(self, fd: int) -> str | None:
        st = os.fstat(fd)
        try:
            rec = json.loads(self._path(st).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("key") != list(_file_key(st)):
            return None
        digest = rec.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def put(self, fd: int, digest: str, before: os.stat_result) -> None:
        """Remember `digest` of the file at `fd` if it is unchanged since `before` (taken before it was
        hashed) and was last changed SETTLED_S ago (so no later write can keep its ctime)."""
        st = os.fstat(fd)
        if _file_key(st) != _file_key(before) or time.time() - st.st_ctime < SETTLED_S:
            return
        with contextlib.suppress(OSError):
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(self._path(st), json.dumps({"key": list(_file_key(st)), "sha256": digest}), mode=0o600)
            known = sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime)
            for old in known[:max(0, len(known) - MAX_KNOWN_DIGESTS)]:
                old.unlink()

    async def settle(self, fd: int) -> None:
        """Wait until the file at `fd` was last changed SETTLED_S ago (a save, before it remembers)."""
        wait = SETTLED_S - (time.time() - os.fstat(fd).st_ctime)
        if wait > 0:
            await asyncio.sleep(wait)


def state_sha256(fd: int, known: KnownDigests) -> str:
    """sha256 of a snapshot's state (or of this host's kernel, initrd or image): remembered by `known`
    when this host hashed that very file since it last changed, else computed (and remembered)."""
    digest = known.get(fd)
    if digest is not None:
        return digest
    before = os.fstat(fd)
    digest = file_sha256(fd)
    known.put(fd, digest, before)
    return digest


def path_sha256(path: Path, known: KnownDigests | None = None) -> str:
    """sha256 of the file at `path` (through `known` when given: see state_sha256)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return file_sha256(fd) if known is None else state_sha256(fd, known)
    finally:
        os.close(fd)


# -- the manifest ------------------------------------------------------------------------------------


@dataclass
class Opened:
    """A snapshot directory opened for a restore: its checked manifest and the state's descriptor."""

    path: Path
    manifest: dict[str, Any]
    state_fd: int

    def close(self) -> None:
        if self.state_fd >= 0:
            os.close(self.state_fd)
            self.state_fd = -1


def _open_in(dir_fd: int, name: str, what: str) -> int:
    """Open `name` in the snapshot directory: a regular file, never through a symlink."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        why = "is a symlink (not followed)" if exc.errno == errno.ELOOP else exc.strerror
        raise SnapshotError(what, f"{name}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(what, f"{name} is not a regular file")
    return fd


def want(data: Any, field: str, kind: type | tuple[type, ...]) -> Any:
    """`data` when it is of `kind` (a bool is not an int here). Raises SnapshotError naming `field`."""
    if not isinstance(data, kind) or (isinstance(data, bool) and kind in (int, float)):
        raise SnapshotError(field, f"expected {getattr(kind, '__name__', kind)}, got {type(data).__name__}")
    return data


def _check_manifest(data: Any) -> dict[str, Any]:
    """Shape and bounds of a parsed manifest (values against this host come later)."""
    m: dict[str, Any] = want(data, "manifest", dict)
    if m.get("kind") != KIND:
        raise SnapshotError("kind", f"{str(m.get('kind'))[:64]!r} is not a pykata sandbox snapshot")
    if m.get("format") != FORMAT:
        raise SnapshotError("format", f"{str(m.get('format'))[:32]} (this pykata reads format {FORMAT})")
    for key in ("pykata_version", "qemu_version", "source_sandbox"):
        want(m.get(key), key, str)
    for key in ("machine", "assets", "state", "extra"):
        want(m.get(key), key, dict)
    devices = want(m.get("devices"), "devices", list)
    if len(devices) > 64:
        raise SnapshotError("devices", f"{len(devices)} devices")
    for i, d in enumerate(devices):
        f = f"devices[{i}]"
        want(d, f, dict)
        if d.get("kind") != "root-slot":
            raise SnapshotError(f"{f}.kind", f"{str(d.get('kind'))[:32]!r} is not a device this pykata restores")
        if not 0 <= want(d.get("slot"), f"{f}.slot", int) < 64:
            raise SnapshotError(f"{f}.slot", "out of range")
        if not KEY_RE.match(want(d.get("key"), f"{f}.key", str)):
            raise SnapshotError(f"{f}.key", "not an image disk key")
        users = want(d.get("containers"), f"{f}.containers", list)
        if len(users) > MAX_CONTAINERS or not all(isinstance(u, str) for u in users):
            raise SnapshotError(f"{f}.containers", "expected container ids")
    st = m["state"]
    want(st.get("size"), "state.size", int)
    if not isinstance(st.get("sha256"), str) or len(st["sha256"]) != 64:
        raise SnapshotError("state.sha256", "expected 64 hex digits")
    containers = want(m.get("containers"), "containers", list)
    if not 1 <= len(containers) <= MAX_CONTAINERS:
        raise SnapshotError("containers", f"{len(containers)} containers (1-{MAX_CONTAINERS})")
    for i, c in enumerate(containers):
        f = f"containers[{i}]"
        want(c, f, dict)
        try:
            ids.check_container_id(want(c.get("id"), f"{f}.id", str))
        except PykataError as e:
            raise SnapshotError(f"{f}.id", str(e)) from None
        if not 0 < want(c.get("pid"), f"{f}.pid", int) < 1 << 22:
            raise SnapshotError(f"{f}.pid", "out of range")
        if not 0 <= want(c.get("exec_seq"), f"{f}.exec_seq", int) < 1 << 40:
            raise SnapshotError(f"{f}.exec_seq", "out of range")
        want(c.get("terminal"), f"{f}.terminal", bool)
        if len(want(c.get("image"), f"{f}.image", str)) > 4096:
            raise SnapshotError(f"{f}.image", "too long")
        cmd = want(c.get("command"), f"{f}.command", list)
        if len(cmd) > 4096 or not all(isinstance(a, str) for a in cmd):
            raise SnapshotError(f"{f}.command", "expected a list of strings")
    return m


def open_snapshot(path: Path) -> Opened:
    """Open and check the snapshot at `path` (no VM yet).

    Raises:
        SnapshotError: not a snapshot directory, a symlink, an unreadable, oversized or malformed
            manifest, a state of the wrong size; the error names the field.
    """
    path = Path(os.path.abspath(path))
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # O_DIRECTORY|O_NOFOLLOW on a symlink fails with ENOTDIR
        why = "is a symlink (not followed)" if os.path.islink(path) else exc.strerror
        raise SnapshotError("path", f"{path}: {why}") from None
    try:
        mfd = _open_in(dir_fd, MANIFEST, "manifest")
        try:
            if os.fstat(mfd).st_size > MAX_MANIFEST:
                raise SnapshotError("manifest", f"larger than {MAX_MANIFEST} bytes")
            raw = os.read(mfd, MAX_MANIFEST + 1)
        finally:
            os.close(mfd)
        try:
            manifest = _check_manifest(json.loads(raw))
        except (ValueError, RecursionError) as exc:
            raise SnapshotError("manifest", f"not valid JSON: {str(exc)[:200]}") from None
        sfd = _open_in(dir_fd, STATE, "state")
    finally:
        os.close(dir_fd)
    size = os.fstat(sfd).st_size
    want = manifest["state"]["size"]
    if size != want:
        os.close(sfd)
        raise SnapshotError("state.size", f"the state file has {size} bytes, the manifest says {want} "
                                          "(truncated or not this snapshot's)")
    return Opened(path, manifest, sfd)
