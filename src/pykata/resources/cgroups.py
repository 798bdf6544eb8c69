"""The host cgroup a sandbox's processes (the shim, QEMU, virtiofsd) are charged to.

With `runtime.sandbox_cgroup_only` they live in the pod's cgroup, the sandbox spec's
`linux.cgroupsPath`, so kubelet's accounting and eviction see the VM's whole cost (Kata's
SandboxCgroupOnly); otherwise in `pykata_overhead/<sandbox id>` beside the pod's cgroup (cgroup_path).
The shim moves itself in before it
starts QEMU and virtiofsd, which inherit it.

    cg = SandboxCgroup.create(Path("/sys/fs/cgroup"), cgroup_path(spec_path, "sb1", pod_only=True))
    cg.add_process(os.getpid())
    ...                                  # the sandbox runs, and ends
    cg.remove()                          # the shim moves back out; the directories cg made are removed

Both layouts are handled: cgroup v2 mounted at the root, or v1 with one hierarchy per
subdirectory (a v2 one, `unified/`, beside them on a hybrid host): the cgroup is made in every
hierarchy, as runc does. `linux.cgroupsPath` comes from the pod spec, so it is untrusted: it must
stay below the root (no `..`, no `.`, no control characters, bounded length), and only the
directories this module made are ever removed. A systemd-style path (`slice:prefix:name`) is
expanded to the directories systemd would use.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pykata.config import RuntimeConfig
from pykata.errors import PykataError

log = logging.getLogger(__name__)

OVERHEAD = "pykata_overhead"
FIELD = "linux.cgroupsPath"
MAX_PATH = 1024
MAX_DEPTH = 32
# seconds rmdir waits for the cgroup's last processes (QEMU just killed) to be gone
REMOVE_TIMEOUT = 5.0
_SYSTEMD = re.compile(r"^([^:/]+):([^:/]*):([^:/]+)$")


class CgroupError(PykataError):
    """A cgroup path is refused (`field` names where it came from), or a cgroup cannot be made or joined."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: `version` 2, or 1 with its `options` ("memory", "name=systemd")."""

    mountpoint: Path
    version: int
    options: frozenset[str] = frozenset()


def hierarchies(root: Path, mountinfo: str | None = None) -> list[Hierarchy]:
    """The hierarchies under `root`: `root` itself when it is cgroup v2, else every cgroup mount directly
    below it (v1 controllers, and v2 at `unified/` on a hybrid host).

    Raises:
        CgroupError: `root` holds no cgroup hierarchy.
    """
    if (root / "cgroup.controllers").exists():
        return [Hierarchy(root, 2)]
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    found: list[Hierarchy] = []
    real_root = os.path.realpath(root)
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        mountpoint = fields[4].replace("\\040", " ")
        if os.path.dirname(mountpoint) != real_root:
            continue
        if rest[0] == "cgroup2":
            found.append(Hierarchy(Path(mountpoint), 2))
        elif rest[0] == "cgroup":
            found.append(Hierarchy(Path(mountpoint), 1, frozenset(rest[2].split(",")) - {"rw", "ro"}))
    if not found:
        raise CgroupError("runtime.cgroup_root", f"no cgroup hierarchy is mounted at or below {root}")
    return sorted(set(found), key=lambda h: str(h.mountpoint))


def cgroup_path(spec_path: object, sandbox_id: str, *, pod_only: bool) -> PurePosixPath:
    """The cgroup (relative to each hierarchy's root) for sandbox `sandbox_id`: the spec's
    `linux.cgroupsPath` when `pod_only` (runtime.sandbox_cgroup_only) and the spec has one, else
    pykata_overhead/<sandbox id> beside the pod's cgroup (the sandbox's cgroupsPath is
    <pod cgroup>/<sandbox id>: kubepods/burstable/pod<uid>/<id> gives
    kubepods/burstable/pykata_overhead/<id>), or at the root when the spec has no path that deep.

    Beside the pod's cgroup, the VM is charged to the pods' tree (kubepods: node allocatable), so a pod
    that grows its VM up to hypervisor.qemu.default_maxmemory cannot take the memory the node keeps for
    the system; the pod's own cgroup, whose limit kubelet sets without the VM's overhead unless the
    RuntimeClass declares it, stays out of it (that is sandbox_cgroup_only's choice).

    Raises:
        CgroupError: field `linux.cgroupsPath`: not a string, too long or deep, `.`/`..`, control
            characters, or a malformed systemd path.
    """
    if spec_path in (None, ""):
        return PurePosixPath(OVERHEAD, _component(sandbox_id, "sandbox id"))
    if not pod_only:
        parts = spec_parts(spec_path)[:-2]
        return PurePosixPath(*parts, OVERHEAD, _component(sandbox_id, "sandbox id"))
    return PurePosixPath(*spec_parts(spec_path))


def spec_parts(spec_path: object) -> list[str]:
    """The directories of a spec's `linux.cgroupsPath` (a systemd one expanded), checked.

    Raises:
        CgroupError: as cgroup_path.
    """
    if not isinstance(spec_path, str):
        raise CgroupError(FIELD, f"must be a string, got {type(spec_path).__name__}")
    if len(spec_path) > MAX_PATH:
        raise CgroupError(FIELD, f"must be at most {MAX_PATH} characters")
    systemd = _SYSTEMD.match(spec_path)
    parts = _systemd_parts(*systemd.groups()) if systemd else [p for p in spec_path.split("/") if p]
    if not parts:
        raise CgroupError(FIELD, f"{spec_path!r} names the root cgroup")
    if len(parts) > MAX_DEPTH:
        raise CgroupError(FIELD, f"must be at most {MAX_DEPTH} levels deep")
    return [_component(p, FIELD) for p in parts]


def _component(name: str, field: str) -> str:
    if name in (".", "..") or "/" in name or not name:
        raise CgroupError(field, f"{name!r} would leave the cgroup tree")
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 255:
        raise CgroupError(field, f"bad cgroup name {name[:64]!r}")
    return name


def _systemd_parts(slice_: str, prefix: str, name: str) -> list[str]:
    """systemd's directories for "slice:prefix:name": kubepods-burstable.slice:cri-containerd:abc gives
    kubepods.slice/kubepods-burstable.slice/cri-containerd-abc.scope."""
    if not slice_.endswith(".slice") or slice_ == ".slice":
        raise CgroupError(FIELD, f"systemd path: {slice_[:64]!r} is not a slice")
    parts: list[str] = []
    if slice_ != "-.slice":
        words = slice_.removesuffix(".slice").split("-")
        if not all(words):
            raise CgroupError(FIELD, f"systemd path: bad slice name {slice_[:64]!r}")
        parts = ["-".join(words[:i + 1]) + ".slice" for i in range(len(words))]
    unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return [*parts, unit]


@dataclass
class SandboxCgroup:
    """The cgroup `path` in each of `hierarchies`; `created` lists the directories made for it (removed
    by `remove`), `origin` where this process was before `add_process` moved it."""

    path: PurePosixPath
    hierarchies: list[Hierarchy]
    created: list[Path] = field(default_factory=list)
    origin: dict[Path, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, path: PurePosixPath) -> SandboxCgroup:
        """Make cgroup `path` (relative) in every hierarchy under `root`; existing levels are kept.

        Raises:
            CgroupError: no hierarchy, the path resolves outside one, or mkdir fails (what was made
                is removed again).
        """
        cg = cls(path, hierarchies(root))
        try:
            for h in cg.hierarchies:
                cg._make(h)
        except BaseException:
            cg.remove()
            raise
        return cg

    def directory(self, h: Hierarchy) -> Path:
        return h.mountpoint / self.path

    def _make(self, h: Hierarchy) -> None:
        for attempt in range(3):
            try:
                self._make_levels(h)
                return
            except FileNotFoundError:
                # another sandbox's remove() took a shared level (pykata_overhead) away in between
                if attempt == 2:
                    raise CgroupError(f"cgroup {self.path}", f"cannot make it in {h.mountpoint}") from None

    def _make_levels(self, h: Hierarchy) -> None:
        real_top = os.path.realpath(h.mountpoint)
        level = h.mountpoint
        for part in self.path.parts:
            level = level / part
            try:
                os.mkdir(level, 0o755)
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise
            except OSError as e:
                raise CgroupError(f"cgroup {self.path}", f"cannot make {level}: {e.strerror}") from None
            else:
                self.created.append(level)
                if "cpuset" in h.options:
                    _init_cpuset(level)
            # cgroupfs has no symlinks, but the root is configuration: never follow one out of it
            if not os.path.realpath(level).startswith(real_top + "/"):
                raise CgroupError(FIELD, f"{level} resolves outside {h.mountpoint}")

    def add_process(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the cgroup in every hierarchy.

        Raises:
            CgroupError: the kernel refused (e.g. a v2 cgroup with controllers enabled for children).
        """
        own = _own_cgroups(self.hierarchies) if pid == os.getpid() else {}
        for h in self.hierarchies:
            try:
                (self.directory(h) / "cgroup.procs").write_text(str(pid))
            except OSError as e:
                raise CgroupError(f"cgroup {self.path}", f"cannot move process {pid} into "
                                                         f"{self.directory(h)}: {e.strerror}") from None
            if h.mountpoint in own:
                self.origin.setdefault(h.mountpoint, own[h.mountpoint])

    def release_process(self, pid: int) -> None:
        """Move process `pid`, a child this process started that is not the sandbox's (a waiting VM
        refilling the warm pool), to where this process came from, so it is neither charged to the
        sandbox nor keeps its cgroup from being removed. Never raises: what cannot be moved is logged."""
        for h in self.hierarchies:
            back = self.origin.get(h.mountpoint, h.mountpoint)
            try:
                (back / "cgroup.procs").write_text(str(pid))
            except OSError as e:
                log.warning("cannot move process %d out of cgroup %s: %s", pid, self.path, e.strerror)

    def remove(self) -> None:
        """Move this process back where it was and remove the directories `create` made, deepest first.
        Idempotent; waits up to REMOVE_TIMEOUT for processes that are ending. Never raises: what cannot
        be removed is logged."""
        pid = str(os.getpid())
        for h in self.hierarchies:
            if h.mountpoint not in self.origin:
                continue
            back = self.origin[h.mountpoint]
            for target in (back, h.mountpoint):
                with contextlib.suppress(OSError):
                    (target / "cgroup.procs").write_text(pid)
                    break
        self.origin.clear()
        deadline = time.monotonic() + REMOVE_TIMEOUT
        leaf_depth = max((len(p.parts) for p in self.created), default=0)
        for directory in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            while True:
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno == errno.EBUSY and len(directory.parts) == leaf_depth \
                            and time.monotonic() < deadline:
                        time.sleep(0.02)  # the last processes (QEMU just killed) are ending
                        continue
                    if len(directory.parts) < leaf_depth and e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        pass  # a level another sandbox uses now (pykata_overhead): its last one removes it
                    else:
                        log.warning("cannot remove cgroup %s: %s", directory, e.strerror)
                        break
                self.created.remove(directory)
                break

    @property
    def owned(self) -> bool:
        """Whether pykata owns this cgroup's limits: the per-sandbox one under pykata_overhead. The
        pod's own cgroup (runtime.sandbox_cgroup_only) is kubelet's, which sets its limits from the
        pod's requests and the RuntimeClass overhead."""
        return len(self.path.parts) >= 2 and self.path.parts[-2] == OVERHEAD

    def set_limits(self, memory_bytes: int | None = None, cpu_quota_us: int | None = None,
                   cpu_period_us: int = 100_000) -> None:
        """Cap what the sandbox's processes (QEMU and its guest, virtiofsd, the shim) may use on the
        host: memory (bytes, v2 memory.max / v1 memory.limit_in_bytes) and CPU time per period (v2
        cpu.max / v1 cpu.cfs_quota_us); None leaves one unchanged. Only for a cgroup pykata `owned`.

        Lowering the memory limit below what the processes use makes the kernel reclaim first; what
        it cannot reclaim fails the write (EBUSY), and the old limit stays.

        Raises:
            CgroupError: the cgroup is not pykata's, or the kernel refused a value.
        """
        if not self.owned:
            raise CgroupError(f"cgroup {self.path}", "is the pod's (kubelet sets its limits), not pykata's")
        for h in self.hierarchies:
            d = self.directory(h)
            writes: list[tuple[Path, str]] = []
            if h.version == 2:
                _enable_controllers(h.mountpoint, self.path, ("memory", "cpu"))
                try:
                    here = set((d / "cgroup.controllers").read_text().split())
                except OSError:
                    here = set()
                # a hybrid host's v2 hierarchy (unified/) has no controllers: its v1 ones take the limits
                if memory_bytes is not None and "memory" in here:
                    writes.append((d / "memory.max", str(memory_bytes)))
                if cpu_quota_us is not None and "cpu" in here:
                    writes.append((d / "cpu.max", f"{cpu_quota_us} {cpu_period_us}"))
            else:
                if memory_bytes is not None and "memory" in h.options:
                    writes.append((d / "memory.limit_in_bytes", str(memory_bytes)))
                if cpu_quota_us is not None and "cpu" in h.options:
                    writes += [(d / "cpu.cfs_period_us", str(cpu_period_us)),
                               (d / "cpu.cfs_quota_us", str(cpu_quota_us))]
            for path, value in writes:
                try:
                    path.write_text(value)
                except OSError as e:
                    raise CgroupError(f"cgroup {self.path}", f"cannot write {value} to {path}: {e.strerror}") from None

    def usage(self) -> dict[str, int]:
        """What the cgroup uses now, for tests and `pykata check`: memory_bytes, memory_peak_bytes,
        memory_limit_bytes, cpu_quota_us (-1: none), from the first hierarchy that has each. Never raises."""
        out: dict[str, int] = {}
        files = {2: {"memory_bytes": "memory.current", "memory_peak_bytes": "memory.peak",
                     "memory_limit_bytes": "memory.max", "cpu_quota_us": "cpu.max"},
                 1: {"memory_bytes": "memory.usage_in_bytes", "memory_peak_bytes": "memory.max_usage_in_bytes",
                     "memory_limit_bytes": "memory.limit_in_bytes", "cpu_quota_us": "cpu.cfs_quota_us"}}
        for h in self.hierarchies:
            for key, name in files[h.version].items():
                if key in out:
                    continue
                with contextlib.suppress(OSError, ValueError, IndexError):
                    text = (self.directory(h) / name).read_text().split()[0]
                    out[key] = -1 if text == "max" else int(text)
        return out

    def record(self) -> str:
        """JSON of what `remove` would remove, for `remove_recorded` after a crash."""
        return json.dumps([str(p) for p in self.created])


def remove_recorded(text: str, root: Path) -> None:
    """Remove the cgroup directories a `record` lists (a dead shim's), only those below `root`."""
    try:
        paths = json.loads(text)
    except ValueError:
        return
    if not isinstance(paths, list):
        return
    real_root = os.path.realpath(root) + "/"
    created = [Path(p) for p in paths if isinstance(p, str) and os.path.realpath(p).startswith(real_root)
               and ".." not in PurePosixPath(p).parts]
    SandboxCgroup(PurePosixPath(OVERHEAD), [], created).remove()


def _own_cgroups(found: list[Hierarchy]) -> dict[Path, Path]:
    """Where this process is now, per hierarchy (from /proc/self/cgroup)."""
    where: dict[Path, Path] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            names = frozenset(controllers.split(",")) - {""}
            for h in found:
                if (h.version == 2 and not names) or (h.version == 1 and names and names <= h.options):
                    where[h.mountpoint] = h.mountpoint / path.lstrip("/")
    return where


def _enable_controllers(mountpoint: Path, path: PurePosixPath, names: tuple[str, ...]) -> None:
    """cgroup v2: a cgroup has memory.max / cpu.max only when every level above enabled the controller
    for its children. Best effort (a level with processes of its own cannot): the write of the limit
    then fails and says so."""
    level = mountpoint
    for part in path.parts:
        with contextlib.suppress(OSError):
            available = (level / "cgroup.controllers").read_text().split()
            enabled = (level / "cgroup.subtree_control").read_text().split()
            missing = [n for n in names if n in available and n not in enabled]
            if missing:
                (level / "cgroup.subtree_control").write_text(" ".join(f"+{n}" for n in missing))
        level = level / part


def _init_cpuset(directory: Path) -> None:
    """A new v1 cpuset cgroup has no CPUs or memory nodes: no process may join it until they are set."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        with contextlib.suppress(OSError):
            if not (directory / name).read_text().strip():
                (directory / name).write_text((directory.parent / name).read_text().strip())


# -- the shim's use: one cgroup per sandbox, recorded so that `shim delete` can remove a dead shim's ----

def _record_path(runtime: RuntimeConfig, sandbox_id: str) -> Path:
    return runtime.runtime_path / "cgroups" / f"{_component(sandbox_id, 'sandbox id')}.json"


def record_path(runtime: RuntimeConfig, sandbox_id: str) -> Path:
    """Where a shim records the cgroups it made for `sandbox_id` (`remove_leftover` reads it; so does
    the sandbox's reaper, pykata.sandbox.reaper). Raises CgroupError for an id that is no path component."""
    return _record_path(runtime, sandbox_id)


def join(runtime: RuntimeConfig, spec_path: object, sandbox_id: str) -> SandboxCgroup:
    """Make the sandbox's cgroup (`cgroup_path`) and move this process (the shim) into it, so that the
    QEMU and virtiofsd it starts next are charged there too.

    Raises:
        CgroupError: as `cgroup_path` and `SandboxCgroup.create`; nothing is left made.
    """
    path = cgroup_path(spec_path, sandbox_id, pod_only=runtime.sandbox_cgroup_only)
    cg = SandboxCgroup.create(Path(runtime.cgroup_root), path)
    try:
        record = _record_path(runtime, sandbox_id)
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cg.record())
        cg.add_process(os.getpid())
    except BaseException:
        leave(cg, runtime, sandbox_id)
        raise
    log.info("sandbox processes are charged to cgroup %s (%s)", path,
             ", ".join(f"v{h.version} {h.mountpoint}" for h in cg.hierarchies))
    return cg


def leave(cg: SandboxCgroup, runtime: RuntimeConfig, sandbox_id: str) -> None:
    """Move the shim back out and remove what `join` made (after the VM is gone). Never raises."""
    cg.remove()
    if not cg.created:
        with contextlib.suppress(OSError, CgroupError):
            _record_path(runtime, sandbox_id).unlink()


def remove_leftover(runtime: RuntimeConfig, sandbox_id: str) -> None:
    """Remove the cgroups a dead shim of `sandbox_id` recorded. Never raises."""
    with contextlib.suppress(OSError, CgroupError):
        record = _record_path(runtime, sandbox_id)
        remove_recorded(record.read_text()[:65536], Path(runtime.cgroup_root))
        record.unlink()
