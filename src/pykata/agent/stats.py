"""Container cgroups in the guest: where they are, their statistics, and OOM kill events.

The guest mounts cgroup v2 (pykata's init); the v1 reading exists because the agent's tests run
on hosts with the legacy hierarchy, where crun puts the container in one cgroup per controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
from pathlib import Path

from pykata.protocols.agent import agent_pb2
from pykata.record import FrozenRecord

log = logging.getLogger("pykata.agent.stats")

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer", "cpuset", "devices")
_NO_LIMIT = 1 << 62  # v1 reports "no limit" as a page-rounded 2**63-1


def cgroup_version(root: Path = CGROUP_ROOT) -> int:
    """2 when `root` is a cgroup2 mount (crun then uses it), else 1."""
    return 2 if (root / "cgroup.controllers").exists() else 1


class Cgroup(FrozenRecord):
    """A container's cgroup: one directory (v2) or one per controller (v1)."""

    __slots__ = ("dirs", "version")
    __match_args__ = ("version", "dirs")
    version: int
    dirs: dict[str, Path]

    def __init__(self, version: int, dirs: dict[str, Path] | None = None) -> None:
        self._init("version", version)
        self._init("dirs", {} if dirs is None else dirs)

    @classmethod
    def at(cls, cgroups_path: str, root: Path = CGROUP_ROOT, version: int | None = None) -> Cgroup:
        rel = cgroups_path.strip("/")
        version = version or cgroup_version(root)
        if version == 2:
            return cls(2, {"": root / rel})
        return cls(1, {c: root / c / rel for c in V1_CONTROLLERS if (root / c).is_dir()})

    def dir(self, controller: str) -> Path | None:
        return self.dirs.get("" if self.version == 2 else controller)

    def read(self, controller: str, name: str) -> str | None:
        d = self.dir(controller)
        if d is None:
            return None
        try:
            return (d / name).read_text()
        except OSError:
            return None

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs.values())

    def pids(self) -> list[int]:
        """Every process in the cgroup (cgroup.procs)."""
        found: set[int] = set()
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return sorted(found)

    def oom_kills(self) -> int:
        """How often the OOM killer has killed in this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _keyed(self.read("memory", name)).get("oom_kill", 0)

    def freezer_state(self) -> str:
        """"frozen", "freezing" or "thawed" ("" when the cgroup is gone)."""
        if self.version == 2:
            events = _keyed(self.read("", "cgroup.events"))
            if events.get("frozen") == 1:
                return "frozen"
            wanted = self.read("", "cgroup.freeze")
            if wanted is None:
                return ""
            return "freezing" if wanted.strip() == "1" else "thawed"
        return (self.read("freezer", "freezer.state") or "").strip().lower()

    def refreeze(self) -> None:
        """Ask a v1 freezer stuck in FREEZING to try again (the kernel retries on each write)."""
        d = self.dir("freezer")
        if self.version == 1 and d is not None:
            with contextlib.suppress(OSError):
                (d / "freezer.state").write_text("FROZEN")

    def remove(self) -> None:
        """rmdir the cgroup directories (crun delete normally does); missing ones are fine."""
        for d in self.dirs.values():
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)


def _int(text: str | None) -> int:
    if text is None:
        return 0
    text = text.strip()
    if text in ("", "max"):
        return 0
    try:
        value = int(text.split()[0])
    except ValueError:
        return 0
    return 0 if value >= _NO_LIMIT else max(value, 0)


def _keyed(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def read_stats(cg: Cgroup) -> agent_pb2.CgroupStats:
    """The cgroup's cpu/memory/pids/io numbers (missing files read as 0)."""
    return _stats_v2(cg) if cg.version == 2 else _stats_v1(cg)


def _stats_v2(cg: Cgroup) -> agent_pb2.CgroupStats:
    cpu = _keyed(cg.read("cpu", "cpu.stat"))
    mem_stat = _keyed(cg.read("memory", "memory.stat"))
    stats = agent_pb2.CgroupStats(cgroup_version=2)
    stats.cpu.CopyFrom(agent_pb2.CpuStats(
        usage_total_ns=cpu.get("usage_usec", 0) * 1000, usage_user_ns=cpu.get("user_usec", 0) * 1000,
        usage_kernel_ns=cpu.get("system_usec", 0) * 1000, throttling_periods=cpu.get("nr_periods", 0),
        throttled_periods=cpu.get("nr_throttled", 0), throttled_time_ns=cpu.get("throttled_usec", 0) * 1000))
    events = _keyed(cg.read("memory", "memory.events"))
    stats.memory.CopyFrom(agent_pb2.MemoryStats(
        usage=_int(cg.read("memory", "memory.current")), max_usage=_int(cg.read("memory", "memory.peak")),
        limit=_int(cg.read("memory", "memory.max")), failcnt=events.get("max", 0),
        swap_usage=_int(cg.read("memory", "memory.swap.current")),
        swap_limit=_int(cg.read("memory", "memory.swap.max")),
        cache=mem_stat.get("file", 0), rss=mem_stat.get("anon", 0),
        stat={k: v for k, v in mem_stat.items() if v >= 0}, oom_kill=events.get("oom_kill", 0)))
    stats.pids.CopyFrom(agent_pb2.PidsStats(current=_int(cg.read("pids", "pids.current")),
                                            limit=_int(cg.read("pids", "pids.max"))))
    for line in (cg.read("io", "io.stat") or "").splitlines():
        dev, *pairs = line.split()
        major, _, minor = dev.partition(":")
        for pair in pairs:
            key, _, value = pair.partition("=")
            if not (major.isdigit() and minor.isdigit() and value.isdigit()):
                continue
            entry = agent_pb2.IoEntry(major=int(major), minor=int(minor), op=key, value=int(value))
            if key in ("rbytes", "wbytes", "dbytes"):
                stats.io.service_bytes.append(entry)
            elif key in ("rios", "wios", "dios"):
                stats.io.serviced.append(entry)
    return stats


def _stats_v1(cg: Cgroup) -> agent_pb2.CgroupStats:
    stats = agent_pb2.CgroupStats(cgroup_version=1)
    hz = os.sysconf("SC_CLK_TCK") or 100
    acct = _keyed(cg.read("cpuacct", "cpuacct.stat"))
    throttle = _keyed(cg.read("cpu", "cpu.stat"))
    stats.cpu.CopyFrom(agent_pb2.CpuStats(
        usage_total_ns=_int(cg.read("cpuacct", "cpuacct.usage")),
        usage_user_ns=acct.get("user", 0) * 1_000_000_000 // hz,
        usage_kernel_ns=acct.get("system", 0) * 1_000_000_000 // hz,
        per_cpu_ns=[int(x) for x in (cg.read("cpuacct", "cpuacct.usage_percpu") or "").split() if x.isdigit()],
        throttling_periods=throttle.get("nr_periods", 0), throttled_periods=throttle.get("nr_throttled", 0),
        throttled_time_ns=throttle.get("throttled_time", 0)))
    mem_stat = _keyed(cg.read("memory", "memory.stat"))
    stats.memory.CopyFrom(agent_pb2.MemoryStats(
        usage=_int(cg.read("memory", "memory.usage_in_bytes")),
        max_usage=_int(cg.read("memory", "memory.max_usage_in_bytes")),
        limit=_int(cg.read("memory", "memory.limit_in_bytes")),
        failcnt=_int(cg.read("memory", "memory.failcnt")),
        swap_usage=_int(cg.read("memory", "memory.memsw.usage_in_bytes")),
        swap_limit=_int(cg.read("memory", "memory.memsw.limit_in_bytes")),
        cache=mem_stat.get("cache", 0), rss=mem_stat.get("rss", 0),
        stat={k: v for k, v in mem_stat.items() if v >= 0}, oom_kill=cg.oom_kills()))
    stats.pids.CopyFrom(agent_pb2.PidsStats(current=_int(cg.read("pids", "pids.current")),
                                            limit=_int(cg.read("pids", "pids.max"))))
    for name, target in (("blkio.throttle.io_service_bytes", stats.io.service_bytes),
                         ("blkio.throttle.io_serviced", stats.io.serviced)):
        for line in (cg.read("blkio", name) or "").splitlines():
            parts = line.split()
            if len(parts) != 3 or ":" not in parts[0] or not parts[2].isdigit():
                continue
            major, _, minor = parts[0].partition(":")
            if major.isdigit() and minor.isdigit():
                target.append(agent_pb2.IoEntry(major=int(major), minor=int(minor), op=parts[1],
                                                value=int(parts[2])))
    return stats


class OOMWatcher:
    """Notices OOM kills in container cgroups.

    On cgroup v2 the kernel notifies a change of `memory.events` to pollers (POLLPRI), so the agent
    sleeps until something happens: one epoll object holds every watched cgroup's file, and the event
    loop waits on it. Under TCG each timer wakeup of an idle guest costs the host CPU, and the former
    4 Hz poll was most of an idle pod's. Files that cannot be watched that way (v1's
    memory.oom_control, which needs cgroup.event_control) are polled every `interval` seconds, only
    while there are some. `check(cid)` lets exit handling look at once, so a container whose init the
    OOM killer took is reported before it is removed.
    """

    def __init__(self, interval: float = 0.25, queue_size: int = 256) -> None:
        self.interval = interval
        self._watched: dict[str, tuple[Cgroup, int]] = {}
        self._polled: set[str] = set()
        self._notified: dict[int, str] = {}  # memory.events descriptor -> container id
        self._fds: dict[str, int] = {}
        self._epoll: select.epoll | None = None
        self._events: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def watch(self, cid: str, cg: Cgroup) -> None:
        self._forget(cid)
        self._watched[cid] = (cg, cg.oom_kills())
        if self._notify(cid, cg):
            return
        self._polled.add(cid)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def unwatch(self, cid: str) -> None:
        self.check(cid)
        self._forget(cid)

    def _forget(self, cid: str) -> None:
        self._watched.pop(cid, None)
        self._polled.discard(cid)
        fd = self._fds.pop(cid, None)
        if fd is not None:
            self._notified.pop(fd, None)
            if self._epoll is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)
            os.close(fd)

    def _notify(self, cid: str, cg: Cgroup) -> bool:
        """Have the kernel wake the loop when `cid`'s memory.events changes; False when it cannot."""
        d = cg.dir("memory")
        if cg.version != 2 or d is None:
            return False
        try:
            fd = os.open(d / "memory.events", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if self._epoll is None:
                self._epoll = select.epoll()
                asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._on_notified)
            # kernfs reports POLLPRI once the file changed after this descriptor last read it; a
            # regular file (unit tests' fake cgroups) refuses epoll with EPERM.
            os.read(fd, 4096)
            self._epoll.register(fd, select.EPOLLPRI)
        except OSError:
            os.close(fd)
            return False
        self._fds[cid] = fd
        self._notified[fd] = cid
        return True

    def _on_notified(self) -> None:
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            cid = self._notified.get(fd)
            if cid is None:
                continue
            try:
                # re-arm: the kernel reports POLLPRI until this descriptor reads the file again
                os.lseek(fd, 0, os.SEEK_SET)
                os.read(fd, 4096)
                self.check(cid)
            except Exception:
                log.exception("OOM check of %s failed", cid)

    def check(self, cid: str) -> None:
        entry = self._watched.get(cid)
        if entry is None:
            return
        cg, seen = entry
        now = cg.oom_kills()
        if now > seen:
            self._watched[cid] = (cg, now)
            if self._events.full():
                self._events.get_nowait()  # the host is not listening: keep the newest
            self._events.put_nowait(cid)

    async def next_event(self) -> str:
        """The id of the next container that had an OOM kill."""
        return await self._events.get()

    async def _poll(self) -> None:
        while True:
            if not self._polled:
                self._wake.clear()
                await self._wake.wait()
            for cid in list(self._polled):
                try:
                    self.check(cid)
                except Exception:
                    log.exception("OOM check of %s failed", cid)
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for cid in list(self._watched):
            self._forget(cid)
        if self._epoll is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
