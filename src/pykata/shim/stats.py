"""The agent's cgroup statistics as the metrics type containerd expects from a shim.

containerd (`ctr task metrics`, CRI's stats) decodes Task.Stats as `io.containerd.cgroups.v1.Metrics`
or `io.containerd.cgroups.v2.Metrics`, chosen by the type URL; which one follows the guest's
hierarchy (the agent says which it read). ctr dereferences nested messages without checking them,
so the ones it prints (memory.usage, cpu.usage) are always present.
"""

from __future__ import annotations

from google.protobuf.any_pb2 import Any

from pykata.protocols import cgroups_v1_pb2, cgroups_v2_pb2, typeurl
from pykata.protocols.agent import agent_pb2

V2_MEMORY_KEYS = {
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty", "file_writeback",
    "anon_thp", "inactive_anon", "active_anon", "inactive_file", "active_file", "unevictable",
    "slab_reclaimable", "slab_unreclaimable", "pgfault", "pgmajfault", "workingset_refault",
    "workingset_activate", "workingset_nodereclaim", "pgrefill", "pgscan", "pgsteal", "pgactivate",
    "pgdeactivate", "pglazyfree", "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc",
}
V1_MEMORY_KEYS = {
    "cache", "rss", "rss_huge", "mapped_file", "dirty", "writeback", "inactive_anon", "active_anon",
    "inactive_file", "active_file", "unevictable", "hierarchical_memory_limit", "hierarchical_swap_limit",
    "total_cache", "total_rss", "total_rss_huge", "total_mapped_file", "total_dirty", "total_writeback",
    "total_inactive_anon", "total_active_anon", "total_inactive_file", "total_active_file", "total_unevictable",
}
V1_RENAMED = {"pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault",
              "total_pgpgin": "total_pg_pg_in", "total_pgpgout": "total_pg_pg_out",
              "total_pgfault": "total_pg_fault", "total_pgmajfault": "total_pg_maj_fault"}


def to_v2(s: agent_pb2.CgroupStats) -> cgroups_v2_pb2.Metrics:
    m = cgroups_v2_pb2.Metrics()
    m.pids.current, m.pids.limit = s.pids.current, s.pids.limit
    c = s.cpu
    m.cpu.usage_usec = c.usage_total_ns // 1000
    m.cpu.user_usec = c.usage_user_ns // 1000
    m.cpu.system_usec = c.usage_kernel_ns // 1000
    m.cpu.nr_periods, m.cpu.nr_throttled = c.throttling_periods, c.throttled_periods
    m.cpu.throttled_usec = c.throttled_time_ns // 1000
    mem = s.memory
    for key, value in mem.stat.items():
        if key in V2_MEMORY_KEYS:
            setattr(m.memory, key, value)
    m.memory.usage, m.memory.usage_limit = mem.usage, mem.limit
    m.memory.swap_usage, m.memory.swap_limit = mem.swap_usage, mem.swap_limit
    m.memory_events.oom_kill = mem.oom_kill
    by_dev: dict[tuple[int, int], cgroups_v2_pb2.IOEntry] = {}
    for e in [*s.io.service_bytes, *s.io.serviced]:
        entry = by_dev.setdefault((e.major, e.minor), cgroups_v2_pb2.IOEntry(major=e.major, minor=e.minor))
        if e.op in ("rbytes", "wbytes", "rios", "wios"):
            setattr(entry, e.op, e.value)
    m.io.usage.extend(by_dev.values())
    for h in s.hugetlb:
        m.hugetlb.add(current=h.usage, max=h.max_usage, pagesize=h.pagesize)
    return m


def to_v1(s: agent_pb2.CgroupStats) -> cgroups_v1_pb2.Metrics:
    m = cgroups_v1_pb2.Metrics()
    m.pids.current, m.pids.limit = s.pids.current, s.pids.limit
    c = s.cpu
    m.cpu.usage.total, m.cpu.usage.user, m.cpu.usage.kernel = c.usage_total_ns, c.usage_user_ns, c.usage_kernel_ns
    m.cpu.usage.per_cpu.extend(c.per_cpu_ns)
    m.cpu.throttling.periods = c.throttling_periods
    m.cpu.throttling.throttled_periods = c.throttled_periods
    m.cpu.throttling.throttled_time = c.throttled_time_ns
    mem = s.memory
    for key, value in mem.stat.items():
        name = V1_RENAMED.get(key, key)
        if name in V1_MEMORY_KEYS or name in V1_RENAMED.values():
            setattr(m.memory, name, value)
    m.memory.cache = m.memory.cache or mem.cache
    m.memory.rss = m.memory.rss or mem.rss
    u = m.memory.usage
    u.usage, u.max, u.limit, u.failcnt = mem.usage, mem.max_usage, mem.limit, mem.failcnt
    m.memory.swap.usage, m.memory.swap.limit = mem.swap_usage, mem.swap_limit
    for e in s.io.service_bytes:
        m.blkio.io_service_bytes_recursive.add(op=e.op, major=e.major, minor=e.minor, value=e.value)
    for e in s.io.serviced:
        m.blkio.io_serviced_recursive.add(op=e.op, major=e.major, minor=e.minor, value=e.value)
    for h in s.hugetlb:
        m.hugetlb.add(usage=h.usage, max=h.max_usage, failcnt=h.failcnt, pagesize=h.pagesize)
    return m


def metrics_any(stats: agent_pb2.CgroupStats) -> Any:
    """The statistics packed as containerd's typeurl Any (v2 unless the guest reported cgroup v1)."""
    return typeurl.pack(to_v1(stats) if stats.cgroup_version == 1 else to_v2(stats))
