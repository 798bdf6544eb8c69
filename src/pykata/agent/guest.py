"""Guest-wide RPCs: details, onlining hot-plugged CPUs and memory, setting the clock, copying files."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import pykata
from pykata.agent import stats
from pykata.agent.storage import DRIVERS
from pykata.agent.validation import check_relative, is_within, open_dir_below
from pykata.errors import Code, FailedPrecondition, Internal, InvalidArgument, ResourceExhausted, error_for
from pykata.protocols.agent import agent_pb2

log = logging.getLogger("pykata.agent.guest")

SYSFS = Path("/sys")
MAX_COPY_FILE_SIZE = 256 << 20   # one file
MAX_COPY_CHUNK = 1 << 20         # one CopyFile call
DEVICE_TYPES = ("virtio-blk", "char")


def details(want_block_size: bool, *, sysfs: Path = SYSFS, cgroup_root: Path = stats.CGROUP_ROOT,
            version: str | None = None) -> agent_pb2.GuestDetailsResponse:
    resp = agent_pb2.GuestDetailsResponse(
        kernel_release=os.uname().release,
        online_cpus=int(os.sysconf("SC_NPROCESSORS_ONLN")),
        mem_total_bytes=_mem_total(),
        agent_details=agent_pb2.AgentDetails(
            version=version or str(pykata.__version__), init_daemon=os.getpid() == 1,
            storage_drivers=list(DRIVERS), device_types=list(DEVICE_TYPES),
            supports_seccomp=has_seccomp(), cgroup_version=stats.cgroup_version(cgroup_root)),
    )
    if want_block_size:
        with contextlib.suppress(OSError, ValueError):
            resp.mem_block_size_bytes = int((sysfs / "devices/system/memory/block_size_bytes").read_text(), 16)
    return resp


def _mem_total() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def has_seccomp() -> bool:
    """Whether the guest kernel has seccomp filters."""
    with contextlib.suppress(OSError):
        return "Seccomp:" in Path("/proc/self/status").read_text()
    return False


def online_cpu_mem(nb_cpus: int, cpu_only: bool, *, sysfs: Path = SYSFS) -> tuple[int, int]:
    """Bring CPUs online or offline until `nb_cpus` are online (0 = all present; the highest numbers
    go offline first, cpu0 never), and offline memory blocks online unless `cpu_only`.

    Returns (CPUs onlined, negative when CPUs were offlined; memory blocks onlined). Raises Internal
    when the kernel refuses every CPU it was asked to change.
    """
    cpu_dir = sysfs / "devices/system/cpu"
    cpus = sorted((p for p in cpu_dir.glob("cpu[0-9]*") if re.fullmatch(r"cpu\d+", p.name)),
                  key=lambda p: int(p.name[3:]))
    online = [p for p in cpus if _is_online(p)]
    want = len(cpus) if nb_cpus == 0 else max(1, min(nb_cpus, len(cpus)))
    changed, failures = 0, []
    if len(online) > want:
        for p in reversed(online):
            if len(online) + changed <= want:
                break
            if not (p / "online").exists():
                continue  # cpu0: cannot go offline
            try:
                (p / "online").write_text("0")
                changed -= 1
            except OSError as exc:
                failures.append(f"{p.name}: {exc.strerror}")
    for p in cpus:
        if len(online) + changed >= want:
            break
        if p in online:
            continue
        try:
            (p / "online").write_text("1")
            changed += 1
        except OSError as exc:
            failures.append(f"{p.name}: {exc.strerror}")
    if failures and changed == 0:
        raise Internal(f"cannot change CPUs: {'; '.join(failures)}")
    onlined_mem = 0
    if not cpu_only:
        for block in sorted((sysfs / "devices/system/memory").glob("memory[0-9]*")):
            state = block / "state"
            try:
                if state.read_text().strip() == "offline":
                    state.write_text("online")
                    onlined_mem += 1
            except OSError as exc:
                log.warning("cannot online %s: %s", block.name, exc.strerror)
    return changed, onlined_mem


def _is_online(cpu: Path) -> bool:
    f = cpu / "online"
    if not f.exists():  # cpu0 usually cannot go offline and has no such file
        return True
    try:
        return f.read_text().strip() == "1"
    except OSError:
        return False


def set_time(sec: int, usec: int) -> None:
    """clock_settime(CLOCK_REALTIME). Raises InvalidArgument for a bad time,
    PERMISSION_DENIED / INTERNAL when the kernel refuses."""
    check_time(sec, usec)
    try:
        # the time module's own call, not ctypes: a template clone's first SetGuestDateTime would
        # load libc through ctypes under TCG's cold translation cache (~1,600 guest blocks)
        time.clock_settime_ns(time.CLOCK_REALTIME, sec * 1_000_000_000 + usec * 1000)
    except OSError as exc:
        code = Code.PERMISSION_DENIED if exc.errno == errno.EPERM else Code.INTERNAL
        raise error_for(code, f"clock_settime: {os.strerror(exc.errno or 0)}") from None


def check_time(sec: int, usec: int) -> None:
    if not 0 <= usec < 1_000_000:
        raise InvalidArgument("usec", f"{usec} is not in [0, 1000000)")
    if not 0 < sec < 2**40:
        raise InvalidArgument("sec", f"{sec} is not a plausible time")


def _copy_target(path: str, roots: Sequence[Path]) -> tuple[Path, list[str]]:
    """(root, components below it) of an absolute `path` inside one of `roots`. Raises InvalidArgument."""
    parts = check_relative("path", path) if path.startswith("/") else None
    if parts is None:
        raise InvalidArgument("path", f"{path!r} is not absolute")
    norm = "/" + "/".join(parts)
    for root in roots:
        root_s = str(root).rstrip("/")
        if is_within(norm, root_s) and norm != root_s:
            return Path(root_s), [p for p in norm[len(root_s):].split("/") if p]
    raise InvalidArgument("path", f"{path!r} is outside {', '.join(map(str, roots))}")


def _copy_special(req: agent_pb2.CopyFileRequest, kind: int, roots: Sequence[Path]) -> None:
    """A directory or a symlink for copy_file. Raises InvalidArgument."""
    if req.file_mode & ~(stat.S_IFMT(req.file_mode) | 0o777) or req.dir_mode & ~0o777:
        raise InvalidArgument("file_mode", "only permission bits (0o777) are allowed")
    root, rel = _copy_target(req.path, roots)
    if kind == stat.S_IFDIR:
        fd = open_dir_below(root, rel, create_mode=stat.S_IMODE(req.file_mode), field="path")
        try:
            # an O_PATH descriptor: change the directory it names through its /proc link
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(req.file_mode))
            os.chown(f"/proc/self/fd/{fd}", req.uid, req.gid)
        finally:
            os.close(fd)
        return
    target = req.data
    if not target or len(target) > 4096 or b"\0" in target:
        raise InvalidArgument("data", "a symlink target must be 1-4096 bytes without NUL")
    dir_fd = open_dir_below(root, rel[:-1], create_mode=req.dir_mode or 0o755, field="path")
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(rel[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise InvalidArgument("path", f"{req.path!r} is a directory")
            os.unlink(rel[-1], dir_fd=dir_fd)
        os.symlink(os.fsdecode(target), rel[-1], dir_fd=dir_fd)
        os.chown(rel[-1], req.uid, req.gid, dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)


def copy_file(req: agent_pb2.CopyFileRequest, roots: Sequence[Path]) -> None:
    """Write one chunk of a file below one of `roots` (no '..', no symlink followed on the way).

    Chunks go to a hidden part file; the one that ends at file_size renames it into place, so a
    reader never sees half a file. As in Kata, `file_mode` with S_IFDIR makes a directory and with
    S_IFLNK a symlink to `data` (what a host copies a whole tree with, when no file system is shared).
    Raises InvalidArgument naming the bad field.
    """
    kind = stat.S_IFMT(req.file_mode)
    if kind in (stat.S_IFDIR, stat.S_IFLNK):
        _copy_special(req, kind, roots)
        return
    if kind not in (0, stat.S_IFREG):
        raise InvalidArgument("file_mode", f"file type {kind:o} is not a regular file, directory or symlink")
    req.file_mode = stat.S_IMODE(req.file_mode)
    if req.file_size > MAX_COPY_FILE_SIZE:
        raise InvalidArgument("file_size", f"{req.file_size} is larger than {MAX_COPY_FILE_SIZE}")
    if len(req.data) > MAX_COPY_CHUNK:
        raise InvalidArgument("data", f"{len(req.data)} bytes in one call, at most {MAX_COPY_CHUNK}")
    if req.offset + len(req.data) > req.file_size:
        raise InvalidArgument("offset",
                              f"offset {req.offset} + {len(req.data)} bytes is past file_size {req.file_size}")
    if req.file_mode & ~0o777 or req.dir_mode & ~0o777:
        raise InvalidArgument("file_mode", "only permission bits (0o777) are allowed")
    parts = check_relative("path", req.path) if req.path.startswith("/") else None
    if parts is None:
        raise InvalidArgument("path", f"{req.path!r} is not absolute")
    norm = "/" + "/".join(parts)
    for root in roots:
        root_s = str(root).rstrip("/")
        if is_within(norm, root_s) and norm != root_s:
            rel = [p for p in norm[len(root_s):].split("/") if p]
            break
    else:
        raise InvalidArgument("path", f"{req.path!r} is outside {', '.join(map(str, roots))}")
    name = rel[-1]
    dir_fd = open_dir_below(Path(root_s), rel[:-1], create_mode=req.dir_mode or 0o755, field="path")
    part = f".{name}.pykata-part"
    try:
        with contextlib.suppress(FileNotFoundError):
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(existing.st_mode) or stat.S_ISDIR(existing.st_mode):
                raise InvalidArgument("path", f"{req.path!r} is a symlink or a directory")
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if req.offset == 0:
            flags |= os.O_TRUNC
            # The guest's directories are often tmpfs, i.e. guest RAM: refuse what cannot fit.
            fs = os.statvfs(f"/proc/self/fd/{dir_fd}")
            if req.file_size > fs.f_bavail * fs.f_frsize:
                raise ResourceExhausted(
                    f"file_size: {req.file_size} bytes do not fit ({fs.f_bavail * fs.f_frsize} free)")
        try:
            fd = os.open(part, flags, req.file_mode or 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidArgument("path", f"{req.path!r}: a symlink is in the way") from None
            raise
        try:
            if os.fstat(fd).st_size < req.offset:
                raise FailedPrecondition(
                    f"path: chunk at offset {req.offset} but only {os.fstat(fd).st_size} bytes written")
            written = 0
            while written < len(req.data):
                written += os.pwrite(fd, req.data[written:], req.offset + written)
            if req.offset + len(req.data) == req.file_size:
                os.ftruncate(fd, req.file_size)
                os.fchmod(fd, req.file_mode or 0o644)
                os.fchown(fd, req.uid, req.gid)
        finally:
            os.close(fd)
        if req.offset + len(req.data) == req.file_size:
            os.rename(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
