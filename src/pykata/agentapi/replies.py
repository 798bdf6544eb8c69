"""Checks of what the agent answers: one function per RPC reply, turning it into what the caller uses.

The guest is untrusted (the workload may own it, agent included), so a reply is input: each function
here is the one place its RPC's answer is bounded and checked, and raises `BadReply` naming the
field that broke the contract (the client adds the sandbox and RPC). The ttrpc layer already bounds a
whole message (`pykata.ttrpc.MAX_MESSAGE_SIZE`); the limits here are what the agent's own contract
allows (pids, exit statuses, how many bytes were asked for).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sized

from pykata import ids
from pykata.protocols.agent import agent_pb2

PID_MAX = 1 << 22            # Linux's PID_MAX_LIMIT: no pid is larger
EXIT_STATUS_MAX = 255        # an exit code, or 128 + signal number
READ_MAX = 1 << 20           # the agent's own cap on one read (agent.validation.MAX_IO_CHUNK)
MAX_TEXT = 4096              # a name, a version, a kernel release
MAX_ITEMS = 4096             # entries of a repeated field (CPUs, io entries, interfaces, routes)
MAX_PROTOCOL_VERSION = 1 << 16  # far above any release; a larger one is a lie, not a newer agent


class BadReply(Exception):
    """A reply field is out of contract; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class AgentVersion:
    agent_version: str
    protocol_version: int


@dataclasses.dataclass(frozen=True)
class Reseeded:
    rng_sample: int  # one draw of the agent's reseeded PRNG (clones must differ)
    boot_id: str     # the guest's boot id now


def _pid(field: str, pid: int) -> int:
    if not 0 < pid <= PID_MAX:
        raise BadReply(field, f"{pid} is not a pid (1..{PID_MAX})")
    return int(pid)


def _text(field: str, value: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit:
        raise BadReply(field, f"{len(value)} characters, at most {limit}")
    return value


def _count(field: str, items: Sized, limit: int = MAX_ITEMS) -> None:
    if len(items) > limit:
        raise BadReply(field, f"{len(items)} entries, at most {limit}")


# -- one function per RPC with an answer worth checking --------------------------------------------

def create_container(resp: agent_pb2.CreateContainerResponse) -> int:
    return _pid("pid", resp.pid)


def start_container(resp: agent_pb2.StartContainerResponse) -> int:
    return _pid("pid", resp.pid)


@dataclasses.dataclass(frozen=True)
class Started:
    """An exec'd process: its pid, how much of the given stdin it took, whether stdin is closed."""

    pid: int
    stdin_written: int
    stdin_closed: bool


@dataclasses.dataclass(frozen=True)
class Exited:
    """A process's exit status and, when asked for, the output that came with it (None: the agent
    sent none; an *_eof of False: read on)."""

    status: int
    stdout: bytes | None = None
    stderr: bytes | None = None
    stdout_eof: bool = False
    stderr_eof: bool = False
    running: bool = False  # not exited yet: a stream held the output asked for (status is 0)


def exec_process(resp: agent_pb2.ExecProcessResponse, stdin_sent: int = 0, close_asked: bool = False) -> Started:
    if resp.stdin_written > stdin_sent:
        raise BadReply("stdin_written", f"{resp.stdin_written} bytes taken of {stdin_sent} sent")
    if resp.stdin_closed and not (close_asked and resp.stdin_written == stdin_sent):
        raise BadReply("stdin_closed", "stdin closed although not asked, or not all of it written")
    return Started(_pid("pid", resp.pid), int(resp.stdin_written), bool(resp.stdin_closed))


@dataclasses.dataclass(frozen=True)
class DiskFile:
    """What a data-disk copy answered: bytes copied, and the file as the copy found it."""

    length: int
    file_size: int
    mode: int
    uid: int
    gid: int


def disk_file(resp: agent_pb2.DiskFileResponse, length: int, exact: bool) -> DiskFile:
    """The answer of a copy of `length` bytes (`exact`: all of them, else at most). A guest can claim
    any size for its file: the caller bounds `file_size` by what it accepts."""
    if resp.length > length or (exact and resp.length != length):
        raise BadReply("length", f"{resp.length} bytes copied, asked {'' if exact else 'at most '}{length}")
    if resp.mode > 0o7777:
        raise BadReply("mode", f"{resp.mode:#o} is not a permission mode")
    if resp.uid > 0xFFFFFFFE or resp.gid > 0xFFFFFFFE:
        raise BadReply("uid", f"{resp.uid}:{resp.gid} is not an owner")
    return DiskFile(int(resp.length), int(resp.file_size), int(resp.mode), int(resp.uid), int(resp.gid))


def wait_process(resp: agent_pb2.WaitProcessResponse) -> int:
    if resp.exit_status > EXIT_STATUS_MAX:
        raise BadReply("exit_status", f"{resp.exit_status} is not an exit status (0..{EXIT_STATUS_MAX})")
    return int(resp.exit_status)


def wait_process_output(resp: agent_pb2.WaitProcessResponse, output_limit: int, bounded: bool = False) -> Exited:
    """The exit status and the output the agent sent with it (at most `output_limit` bytes a stream).
    `bounded`: the wait was limited in time, so a running process may come with no output."""
    status = wait_process(resp)
    if not resp.output:
        if resp.stdout or resp.stderr or resp.stdout_eof or resp.stderr_eof or resp.running:
            raise BadReply("output", "output fields set without `output`")
        return Exited(status)
    if resp.running and (status or not (bounded or resp.stdout or resp.stderr)):
        raise BadReply("running", "a running process with an exit status, or with no output to hand over")
    limit = min(output_limit, READ_MAX)
    for field, data in (("stdout", resp.stdout), ("stderr", resp.stderr)):
        if len(data) > limit:
            raise BadReply(field, f"{len(data)} bytes, at most {limit} were asked for")
    return Exited(status, bytes(resp.stdout), bytes(resp.stderr), bool(resp.stdout_eof), bool(resp.stderr_eof),
                  bool(resp.running))


def read_stream(resp: agent_pb2.ReadStreamResponse, max_length: int) -> bytes | None:
    """The bytes read, or None at the end of the stream. Neither data nor the end is out of contract
    (the agent waits until it has one or the other): accepted, it would make the reader loop forever."""
    limit = min(max_length or READ_MAX, READ_MAX)
    if len(resp.data) > limit:
        raise BadReply("data", f"{len(resp.data)} bytes, at most {limit} were asked for")
    if resp.eof and not resp.data:
        return None
    if not resp.data:
        raise BadReply("data", "no data and no end of stream: a reader would never progress")
    return bytes(resp.data)


def write_stdin(resp: agent_pb2.WriteStreamResponse, sent: int) -> int:
    """Bytes accepted: at least one of a non-empty write (the agent blocks until it can take one), at
    most what was sent; a reply of 0 would make the writer loop forever."""
    if sent and not 0 < resp.length <= sent:
        raise BadReply("length", f"{resp.length} bytes accepted of {sent} sent")
    return int(resp.length)


def stats_container(resp: agent_pb2.StatsContainerResponse) -> agent_pb2.StatsContainerResponse:
    s = resp.cgroup_stats
    if s.cgroup_version not in (0, 1, 2):
        raise BadReply("cgroup_stats.cgroup_version", f"{s.cgroup_version} is not 1 or 2")
    _count("cgroup_stats.cpu.per_cpu_ns", s.cpu.per_cpu_ns)
    _count("cgroup_stats.memory.stat", s.memory.stat)
    for key in s.memory.stat:
        _text("cgroup_stats.memory.stat key", key, 256)
    _count("cgroup_stats.io.service_bytes", s.io.service_bytes)
    _count("cgroup_stats.io.serviced", s.io.serviced)
    for e in (*s.io.service_bytes, *s.io.serviced):
        _text("cgroup_stats.io op", e.op, 64)
    _count("cgroup_stats.hugetlb", s.hugetlb, 64)
    for h in s.hugetlb:
        _text("cgroup_stats.hugetlb.pagesize", h.pagesize, 64)
    _count("network_stats", resp.network_stats, 256)
    for n in resp.network_stats:
        _text("network_stats.name", n.name, 64)
    return resp


def get_oom_event(resp: agent_pb2.OOMEvent) -> str:
    """The container that had an OOM kill ("" for none)."""
    if resp.container_id and not ids.is_valid_id(resp.container_id):
        raise BadReply("container_id", f"{resp.container_id[:80]!r} is not a container id")
    return resp.container_id


def get_guest_details(resp: agent_pb2.GuestDetailsResponse) -> agent_pb2.GuestDetailsResponse:
    _text("kernel_release", resp.kernel_release, 256)
    d = resp.agent_details
    _text("agent_details.version", d.version, 256)
    for name, items in (("storage_drivers", d.storage_drivers), ("device_types", d.device_types)):
        _count(f"agent_details.{name}", items, 64)
        for item in items:
            _text(f"agent_details.{name}", item, 64)
    return resp


def interface(resp: agent_pb2.Interface) -> agent_pb2.Interface:
    _count("addresses", resp.addresses, 256)
    for name in ("device", "name", "hw_addr", "type", "current_hw_addr"):
        _text(name, getattr(resp, name), 64)
    return resp


def interfaces(resp: agent_pb2.Interfaces) -> list[agent_pb2.Interface]:
    _count("interfaces", resp.interfaces, 1024)
    return [interface(i) for i in resp.interfaces]


def routes(resp: agent_pb2.Routes) -> list[agent_pb2.Route]:
    _count("routes", resp.routes)
    for r in resp.routes:
        for name in ("dest", "gateway", "device", "source"):
            _text(f"routes.{name}", getattr(r, name), 64)
    return list(resp.routes)


_GUEST_NAME = re.compile(r"^[A-Za-z0-9._@:-]{1,32}$")  # an interface or disk: a label value
MAX_GUEST_DEVICES = 64
MAX_LOAD = 1e6


def _names(field: str, items: list[agent_pb2.NetworkStats] | list[agent_pb2.DiskStats]) -> None:
    _count(field, items, MAX_GUEST_DEVICES)
    seen = set()
    for item in items:
        if not _GUEST_NAME.match(item.name) or item.name in seen:
            raise BadReply(f"{field}.name", f"{item.name[:40]!r}: not a device name, or twice")
        seen.add(item.name)


def guest_metrics(resp: agent_pb2.GuestMetrics) -> agent_pb2.GuestMetrics:
    """Counts and names only (they become label values); the numbers are bounded by their user, who
    knows the VM's size (pykata.monitor)."""
    _names("interfaces", list(resp.interfaces))
    _names("disks", list(resp.disks))
    for name in ("load1", "load5", "load15"):
        value = getattr(resp.load, name)
        if not 0 <= value <= MAX_LOAD:  # also refuses NaN
            raise BadReply(f"load.{name}", f"{value} is not a load average")
    return resp


_BOOT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def reseed_random_dev(resp: agent_pb2.ReseedRandomDevResponse) -> Reseeded:
    if resp.boot_id and not _BOOT_ID.match(resp.boot_id):
        raise BadReply("boot_id", f"{resp.boot_id[:80]!r} is not a lower-case UUID")
    return Reseeded(int(resp.rng_sample), resp.boot_id)


def health(resp: agent_pb2.HealthCheckResponse) -> bool:
    return bool(resp.status == agent_pb2.HealthCheckResponse.SERVING)


@dataclasses.dataclass(frozen=True)
class GuestClocks:
    """The guest's CLOCK_MONOTONIC and CLOCK_MONOTONIC_COARSE in one Health.Check answer (ns). The
    coarse clock is the monotonic one as of the guest's last timer tick: a guest whose tick is dead
    (its APIC timer disabled at boot, "APIC frequency too slow") keeps the clocksource running and
    answers RPCs, but its coarse clock stands still, and so do its sleeps and timeouts."""

    clock_ns: int
    tick_clock_ns: int

    @property
    def lag_ns(self) -> int:
        """How far the coarse clock is behind: a few ms (one tick, 4 ms at HZ 250) in a healthy guest."""
        return self.clock_ns - self.tick_clock_ns


# A coarse clock further behind than this makes the host ask again (a guest starved by a busy host
# may lag for a while, and then catches up at its next tick); one that has not moved at all while the
# monotonic clock went on by TICK_STALL_NS (50 ticks at HZ 250) has no tick.
TICK_LAG_NS = 200_000_000
TICK_STALL_NS = 200_000_000


def guest_clocks(resp: agent_pb2.HealthCheckResponse) -> GuestClocks | None:
    """The clocks of a Check answer; None from an agent that sends none (older than the fields)."""
    if resp.clock_ns == 0 and resp.tick_clock_ns == 0:
        return None
    # read after the monotonic clock, the coarse one is at most one tick ahead of it
    if resp.tick_clock_ns > resp.clock_ns + 1_000_000_000:
        raise BadReply("tick_clock_ns", f"{resp.tick_clock_ns} is ahead of clock_ns {resp.clock_ns}")
    return GuestClocks(int(resp.clock_ns), int(resp.tick_clock_ns))


def tick_stalled(first: GuestClocks, second: GuestClocks) -> bool:
    """Whether the guest's tick is dead, by two answers: its coarse clock did not move at all while its
    monotonic clock went on by TICK_STALL_NS or more."""
    return second.tick_clock_ns == first.tick_clock_ns and second.clock_ns - first.clock_ns >= TICK_STALL_NS


def version(resp: agent_pb2.VersionCheckResponse) -> AgentVersion:
    # every agent ever released answers 1 or more (0 is proto3's "absent")
    if not 1 <= resp.protocol_version <= MAX_PROTOCOL_VERSION:
        raise BadReply("protocol_version", f"{resp.protocol_version} is not a protocol version "
                                           f"(1..{MAX_PROTOCOL_VERSION})")
    return AgentVersion(_text("agent_version", resp.agent_version, 64), int(resp.protocol_version))
