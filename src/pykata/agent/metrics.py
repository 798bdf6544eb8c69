"""GetGuestMetrics: the guest's memory, load, CPU time, network and disk counters, and the agent's own
process, read from /proc in one pass (a few small files; no thread, no subprocess).

Also the guest's network counters of StatsContainer (containers share the guest's network namespace).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from pykata.protocols.agent import agent_pb2

PROC = Path("/proc")
MAX_INTERFACES = 64
MAX_DISKS = 64
NAME_RE = re.compile(r"^[A-Za-z0-9._@:-]{1,32}$")
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MEMINFO = {"MemTotal": "total", "MemFree": "free", "MemAvailable": "available", "Buffers": "buffers",
            "Cached": "cached", "Shmem": "shmem", "SwapTotal": "swap_total", "SwapFree": "swap_free"}
_CPU_FIELDS = ("user_ns", "nice_ns", "system_ns", "idle_ns", "iowait_ns", "irq_ns", "softirq_ns", "steal_ns")


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text()
    return ""


def memory(proc: Path = PROC) -> agent_pb2.GuestMemory:
    out = agent_pb2.GuestMemory()
    for line in _read(proc / "meminfo").splitlines():
        key, _, rest = line.partition(":")
        name = _MEMINFO.get(key)
        if name:
            with contextlib.suppress(ValueError, IndexError):
                setattr(out, name, int(rest.split()[0]) * 1024)
    return out


def load(proc: Path = PROC) -> agent_pb2.GuestLoad:
    out = agent_pb2.GuestLoad()
    with contextlib.suppress(ValueError, IndexError):
        f = _read(proc / "loadavg").split()
        running, threads = f[3].split("/")
        out.load1, out.load5, out.load15 = float(f[0]), float(f[1]), float(f[2])
        out.running, out.threads = int(running), int(threads)
    return out


def cpu(proc: Path = PROC) -> agent_pb2.GuestCpuTime:
    out = agent_pb2.GuestCpuTime()
    for line in _read(proc / "stat").splitlines():
        if line.startswith("cpu "):
            with contextlib.suppress(ValueError):
                for name, ticks in zip(_CPU_FIELDS, line.split()[1:], strict=False):
                    setattr(out, name, int(ticks) * _TICK_NS)
            break
    return out


def network(proc: Path = PROC) -> list[agent_pb2.NetworkStats]:
    """/proc/net/dev of the agent's network namespace (the pod's), at most MAX_INTERFACES."""
    out = []
    for line in _read(proc / "net/dev").splitlines()[2:]:
        name, sep, rest = line.partition(":")
        name = name.strip()
        f = rest.split()
        if not sep or len(f) < 16 or not NAME_RE.match(name):
            continue
        with contextlib.suppress(ValueError):
            v = [int(x) for x in f]
            out.append(agent_pb2.NetworkStats(
                name=name, rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2], rx_dropped=v[3],
                tx_bytes=v[8], tx_packets=v[9], tx_errors=v[10], tx_dropped=v[11]))
        if len(out) >= MAX_INTERFACES:
            break
    return out


def disks(proc: Path = PROC) -> list[agent_pb2.DiskStats]:
    """/proc/diskstats (sectors are 512 bytes whatever the device's), skipping loop and ram devices."""
    out = []
    for line in _read(proc / "diskstats").splitlines():
        f = line.split()
        if len(f) < 14 or not NAME_RE.match(f[2]) or f[2].startswith(("loop", "ram")):
            continue
        with contextlib.suppress(ValueError):
            out.append(agent_pb2.DiskStats(name=f[2], reads=int(f[3]), read_bytes=int(f[5]) * 512,
                                           writes=int(f[7]), write_bytes=int(f[9]) * 512,
                                           io_time_ns=int(f[12]) * 1_000_000))
        if len(out) >= MAX_DISKS:
            break
    return out


def agent_process(processes: int, proc: Path = PROC) -> agent_pb2.AgentProcessStats:
    out = agent_pb2.AgentProcessStats(processes=processes)
    with contextlib.suppress(ValueError, IndexError):
        # fields after the command name, which may hold spaces and parentheses
        f = _read(proc / "self/stat").rpartition(")")[2].split()
        out.cpu_user_ns, out.cpu_system_ns = int(f[11]) * _TICK_NS, int(f[12]) * _TICK_NS
        out.threads = int(f[17])
        out.resident_bytes = int(f[21]) * _PAGE
    with contextlib.suppress(OSError):
        out.open_fds = len(os.listdir(proc / "self/fd"))
    return out


def guest_metrics(processes: int, proc: Path = PROC) -> agent_pb2.GuestMetrics:
    uptime = 0
    with contextlib.suppress(ValueError, IndexError):
        uptime = int(float(_read(proc / "uptime").split()[0]) * 1e9)
    return agent_pb2.GuestMetrics(memory=memory(proc), load=load(proc), cpu=cpu(proc), interfaces=network(proc),
                                  disks=disks(proc), agent=agent_process(processes, proc), uptime_ns=uptime,
                                  online_cpus=int(os.sysconf("SC_NPROCESSORS_ONLN")))
