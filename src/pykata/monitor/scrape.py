"""One collection of every running sandbox: host figures from /proc, guest figures from its agent, the
owner's own counters (RPCs, events) from the owner.

A sandbox is found by its record (pykata.sandbox.status); its owner process (the shim, or `pykata run`)
and its VMM are read with psutil; its agent is reached through the owner's agent proxy
(`AttachedSandbox`, one connection per sandbox kept across collections), with a deadline per sandbox so
one hung guest cannot stall the others. Per sandbox one GetGuestMetrics and one StatsContainer per running
container, concurrently. The guest is untrusted: agentapi already bounds each reply (sizes, counts, names);
here every number it sends must also lie in its bounds (what the VM's size allows, else [0,
GUEST_VALUE_MAX]) or the guest's whole answer is dropped and counted as an error.

`pykata.monitor.collector` runs this in the background; a scrape serves its last result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pykata.agentapi.errors import AgentCallError
from pykata.agentapi.replies import GuestClocks, tick_stalled
from pykata.config import Config
from pykata.errors import Code, PykataError
from pykata.ids import names_vm
from pykata.monitor.defaults import DEFAULT_TIMEOUT, PSS_MAX_AGE
from pykata.protocols.agent import agent_pb2
from pykata.protocols.owner import owner_pb2
from pykata.sandbox import state, status
from pykata.sandbox.lookup import Found
from pykata.sandbox.remote import AttachedSandbox

log = logging.getLogger(__name__)

GUEST_VALUE_MAX = 1 << 60      # no honest counter of a VM gets near this (1 EiB, 36 years of ns)
MAX_CONTAINERS_SCRAPED = 64    # from the host's record, not the guest; bounds one sandbox's RPCs

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    kind: str          # "gauge" or "counter"
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)


# name -> (kind, help). Counters are named without `_total` (prometheus_client adds it).
FAMILIES: dict[str, tuple[str, str]] = {
    "pykata_shim_cpu_seconds": ("counter", "CPU time (user+system) of the sandbox's owner process (shim or CLI)."),
    "pykata_shim_resident_memory_bytes": ("gauge", "RSS of the sandbox's owner process."),
    "pykata_shim_open_fds": ("gauge", "Open file descriptors of the sandbox's owner process."),
    "pykata_shim_threads": ("gauge", "Threads of the sandbox's owner process."),
    "pykata_hypervisor_cpu_seconds": ("counter", "CPU time (user+system) of the VMM (QEMU)."),
    "pykata_hypervisor_resident_memory_bytes": ("gauge", "RSS of the VMM."),
    "pykata_hypervisor_proportional_memory_bytes": ("gauge", "PSS of the VMM (smaps_rollup)."),
    "pykata_hypervisor_threads": ("gauge", "Threads of the VMM."),
    "pykata_hypervisor_open_fds": ("gauge", "Open file descriptors of the VMM."),
    "pykata_hypervisor_io_read_bytes": ("counter", "Bytes the VMM read (rchar)."),
    "pykata_hypervisor_io_write_bytes": ("counter", "Bytes the VMM wrote (wchar)."),
    "pykata_hypervisor_vcpus": ("gauge", "vCPUs the VM was started with."),
    "pykata_hypervisor_memory_bytes": ("gauge", "Boot memory of the VM."),
    "pykata_hypervisor_uptime_seconds": ("gauge", "Seconds since the sandbox was created."),
    "pykata_shim_rpc": ("counter", "Task API RPCs the shim served, by method (0 for other owners)."),
    "pykata_shim_rpc_errors": ("counter", "Task API RPCs the shim served that failed, by method."),
    "pykata_shim_rpc_duration_seconds": ("counter", "Wall time of the task API RPCs the shim served, by method."),
    "pykata_shim_agent_rpc": ("counter", "RPCs the owner made to the agent, by method."),
    "pykata_shim_agent_rpc_errors": ("counter", "RPCs the owner made to the agent that failed, by method."),
    "pykata_shim_agent_rpc_duration_seconds": ("counter", "Wall time of the owner's agent RPCs, by method."),
    "pykata_shim_events_sent": ("counter", "Task events the shim sent to containerd."),
    "pykata_shim_events_dropped": ("counter", "Task events the shim dropped (guest-caused over their rate, "
                                   "or undeliverable)."),
    "pykata_agent_up": ("gauge", "1 when the agent answered the last collection in time and in contract, else 0."),
    "pykata_guest_tick_stalled": ("gauge", "1 when the guest's timer tick is dead: its coarse clock stood still "
                                  "between the last two collections while its monotonic clock went on (its "
                                  "sleeps and timeouts never end), else 0."),
    "pykata_agent_cpu_seconds": ("counter", "CPU time of the agent's process in the guest, by mode."),
    "pykata_agent_resident_memory_bytes": ("gauge", "RSS of the agent's process in the guest."),
    "pykata_agent_threads": ("gauge", "Threads of the agent's process in the guest."),
    "pykata_agent_open_fds": ("gauge", "Open file descriptors of the agent's process in the guest."),
    "pykata_agent_processes": ("gauge", "Processes the agent keeps (containers' inits and execs, debug console)."),
    "pykata_guest_online_cpus": ("gauge", "CPUs online in the guest."),
    "pykata_guest_memory_total_bytes": ("gauge", "MemTotal of the guest."),
    "pykata_guest_memory_free_bytes": ("gauge", "MemFree of the guest."),
    "pykata_guest_memory_available_bytes": ("gauge", "MemAvailable of the guest."),
    "pykata_guest_memory_buffers_bytes": ("gauge", "Buffers of the guest."),
    "pykata_guest_memory_cached_bytes": ("gauge", "Cached of the guest."),
    "pykata_guest_memory_shmem_bytes": ("gauge", "Shmem of the guest (its tmpfs, containers' upper layers)."),
    "pykata_guest_memory_swap_total_bytes": ("gauge", "SwapTotal of the guest."),
    "pykata_guest_memory_swap_free_bytes": ("gauge", "SwapFree of the guest."),
    "pykata_guest_load1": ("gauge", "Load average of the guest, 1 minute."),
    "pykata_guest_load5": ("gauge", "Load average of the guest, 5 minutes."),
    "pykata_guest_load15": ("gauge", "Load average of the guest, 15 minutes."),
    "pykata_guest_tasks_running": ("gauge", "Runnable tasks in the guest."),
    "pykata_guest_threads": ("gauge", "Threads in the guest."),
    "pykata_guest_cpu_seconds": ("counter", "CPU time of the guest, summed over its CPUs, by mode."),
    "pykata_guest_uptime_seconds": ("gauge", "Seconds since the guest booted (a clone counts its template's)."),
    "pykata_guest_container_cpu_seconds": ("counter", "CPU time of a container's cgroup in the guest."),
    "pykata_guest_container_memory_usage_bytes": ("gauge", "Memory usage of a container's cgroup in the guest."),
    "pykata_guest_container_pids": ("gauge", "Tasks in a container's cgroup in the guest."),
    "pykata_guest_network_receive_bytes": ("counter", "Bytes received by a guest interface."),
    "pykata_guest_network_transmit_bytes": ("counter", "Bytes sent by a guest interface."),
    "pykata_guest_network_receive_packets": ("counter", "Packets received by a guest interface."),
    "pykata_guest_network_transmit_packets": ("counter", "Packets sent by a guest interface."),
    "pykata_guest_network_receive_errors": ("counter", "Receive errors of a guest interface."),
    "pykata_guest_network_transmit_errors": ("counter", "Transmit errors of a guest interface."),
    "pykata_guest_network_receive_drops": ("counter", "Received packets a guest interface dropped."),
    "pykata_guest_network_transmit_drops": ("counter", "Packets to send a guest interface dropped."),
    "pykata_guest_disk_reads": ("counter", "Reads completed by a guest disk."),
    "pykata_guest_disk_read_bytes": ("counter", "Bytes read by a guest disk."),
    "pykata_guest_disk_writes": ("counter", "Writes completed by a guest disk."),
    "pykata_guest_disk_written_bytes": ("counter", "Bytes written by a guest disk."),
    "pykata_guest_disk_io_time_seconds": ("counter", "Time a guest disk spent doing I/O."),
    "pykata_monitor_sandboxes": ("gauge", "Running sandboxes found by the last scrape."),
    "pykata_monitor_scrape_duration_seconds": ("gauge", "Wall time of the last collection of one sandbox."),
    "pykata_monitor_sample_age_seconds": ("gauge", "Age of the figures of one sandbox served by this scrape."),
    "pykata_monitor_collect_seconds": ("gauge", "Wall time of the last collection of every sandbox (background)."),
    "pykata_monitor_scrape_seconds": ("gauge", "Wall time of this scrape (serving the last collection)."),
    "pykata_monitor_scrape_errors": ("counter", "Scrape errors since the monitor started, by sandbox and stage."),
}


class BadGuestValue(PykataError):
    def __init__(self, name: str, value: float, limit: float = GUEST_VALUE_MAX) -> None:
        super().__init__(f"guest value {name}={value} is out of bounds [0, {limit:.0f}]")


def _guest(name: str, value: float, limit: float = GUEST_VALUE_MAX) -> float:
    if not 0 <= value <= limit:
        raise BadGuestValue(name, value, limit)
    return float(value)


class Sample:
    """The samples of one sandbox, added to only if the sandbox is still there at the end."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.rows: list[tuple[str, Labels, float]] = []

    def add(self, name: str, value: float | None, **labels: str) -> None:
        if value is not None:
            self.rows.append((name, (("sandbox_id", self.sandbox_id), *labels.items()), float(value)))


def _host(sample: Sample, record: state.SandboxRecord) -> tuple[int | None, int | None]:
    """Owner and VMM figures; the VM's vCPUs and memory (bytes). Raises psutil.Error when a process is gone."""
    owner = status.process_info(record.owner_pid)
    sample.add("pykata_shim_cpu_seconds", owner.cpu_seconds)
    sample.add("pykata_shim_resident_memory_bytes", owner.rss_bytes)
    sample.add("pykata_shim_open_fds", owner.fds)
    sample.add("pykata_shim_threads", owner.threads)
    sample.add("pykata_hypervisor_uptime_seconds", max(0.0, time.time() - record.created_at))
    if not record.vmm_pid:
        return None, None
    argv = psutil.Process(record.vmm_pid).cmdline()
    if not names_vm(argv, record.id):  # the pid was reused: not our VMM any more
        raise psutil.NoSuchProcess(record.vmm_pid)
    vmm = status.process_info(record.vmm_pid, io=True)
    vcpus, memory_mib, _ = status.vm_shape(argv)
    # the guest may bring up every vCPU QEMU has (a resized microvm): the bound below is 4x that
    most = status.vm_max_vcpus(argv)
    sample.add("pykata_hypervisor_cpu_seconds", vmm.cpu_seconds)
    sample.add("pykata_hypervisor_resident_memory_bytes", vmm.rss_bytes)
    sample.add("pykata_hypervisor_threads", vmm.threads)
    sample.add("pykata_hypervisor_open_fds", vmm.fds)
    sample.add("pykata_hypervisor_io_read_bytes", vmm.read_bytes)
    sample.add("pykata_hypervisor_io_write_bytes", vmm.write_bytes)
    sample.add("pykata_hypervisor_vcpus", vcpus)
    memory = None if memory_mib is None else memory_mib << 20
    sample.add("pykata_hypervisor_memory_bytes", memory)
    return max(vcpus or 0, most or 0) or None, memory


PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT
CPUS_MAX = 8192    # Linux's largest NR_CPUS
FDS_MAX = 1 << 20  # Linux's default nr_open
_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_MEMORY = ("total", "free", "available", "buffers", "cached", "shmem", "swap_total", "swap_free")
_NET = (("receive_bytes", "rx_bytes"), ("transmit_bytes", "tx_bytes"), ("receive_packets", "rx_packets"),
        ("transmit_packets", "tx_packets"), ("receive_errors", "rx_errors"), ("transmit_errors", "tx_errors"),
        ("receive_drops", "rx_dropped"), ("transmit_drops", "tx_dropped"))
MAX_METHODS = 64   # of one owner's RPC counts (the task API has 20 methods, the agent's 36)


def _guest_rows(metrics: agent_pb2.GuestMetrics, stats: list[tuple[str, agent_pb2.StatsContainerResponse]],
                vcpus: int | None, memory_bytes: int | None) -> list[tuple[str, float, dict[str, str]]]:
    """What the agent told of the guest, within what the host knows of the VM (its vCPUs and memory from
    QEMU's command line; hot-plug may add up to 4x). Raises BadGuestValue."""
    max_cpus = 4 * vcpus if vcpus else CPUS_MAX
    max_mem = 4 * memory_bytes if memory_bytes else GUEST_VALUE_MAX
    rows: list[tuple[str, float, dict[str, str]]] = []

    def add(name: str, what: str, value: float, limit: float = GUEST_VALUE_MAX, scale: float = 1.0,
            **labels: str) -> None:
        rows.append((name, _guest(what, value, limit) * scale, labels))

    add("pykata_guest_online_cpus", "online_cpus", metrics.online_cpus, max_cpus)
    for key in _MEMORY:
        add(f"pykata_guest_memory_{key}_bytes", f"memory.{key}", getattr(metrics.memory, key), max_mem)
    add("pykata_guest_load1", "load.load1", metrics.load.load1)
    add("pykata_guest_load5", "load.load5", metrics.load.load5)
    add("pykata_guest_load15", "load.load15", metrics.load.load15)
    add("pykata_guest_tasks_running", "load.running", metrics.load.running, PID_MAX)
    add("pykata_guest_threads", "load.threads", metrics.load.threads, PID_MAX)
    for mode in _CPU_MODES:
        add("pykata_guest_cpu_seconds", f"cpu.{mode}_ns", getattr(metrics.cpu, f"{mode}_ns"), scale=1e-9, mode=mode)
    add("pykata_guest_uptime_seconds", "uptime_ns", metrics.uptime_ns, scale=1e-9)
    for n in metrics.interfaces:  # names checked by agentapi (count, characters, unique)
        for family, key in _NET:
            add(f"pykata_guest_network_{family}", key, getattr(n, key), interface=n.name)
    for d in metrics.disks:
        add("pykata_guest_disk_reads", "reads", d.reads, disk=d.name)
        add("pykata_guest_disk_read_bytes", "read_bytes", d.read_bytes, disk=d.name)
        add("pykata_guest_disk_writes", "writes", d.writes, disk=d.name)
        add("pykata_guest_disk_written_bytes", "write_bytes", d.write_bytes, disk=d.name)
        add("pykata_guest_disk_io_time_seconds", "io_time_ns", d.io_time_ns, scale=1e-9, disk=d.name)
    a = metrics.agent
    add("pykata_agent_cpu_seconds", "agent.cpu_user_ns", a.cpu_user_ns, scale=1e-9, mode="user")
    add("pykata_agent_cpu_seconds", "agent.cpu_system_ns", a.cpu_system_ns, scale=1e-9, mode="system")
    add("pykata_agent_resident_memory_bytes", "agent.resident_bytes", a.resident_bytes, max_mem)
    add("pykata_agent_threads", "agent.threads", a.threads, PID_MAX)
    add("pykata_agent_open_fds", "agent.open_fds", a.open_fds, FDS_MAX)
    add("pykata_agent_processes", "agent.processes", a.processes, PID_MAX)
    for cid, st in stats:
        cg = st.cgroup_stats
        add("pykata_guest_container_cpu_seconds", "cpu.usage_total_ns", cg.cpu.usage_total_ns, scale=1e-9,
            container_id=cid)
        add("pykata_guest_container_memory_usage_bytes", "memory.usage", cg.memory.usage, max_mem, container_id=cid)
        add("pykata_guest_container_pids", "pids.current", cg.pids.current, PID_MAX, container_id=cid)
    return rows


def _owner_rows(owner: owner_pb2.OwnerMetrics) -> list[tuple[str, float, dict[str, str]]]:
    """The owner's counters (a pykata process on this host; still bounded: it is a socket in a directory)."""
    rows: list[tuple[str, float, dict[str, str]]] = []
    for prefix, items in (("pykata_shim_rpc", owner.served), ("pykata_shim_agent_rpc", owner.agent_calls)):
        for r in items[:MAX_METHODS]:
            if not r.method.isidentifier() or len(r.method) > 64:
                continue
            rows.append((prefix, float(r.calls), {"method": r.method}))
            rows.append((f"{prefix}_errors", float(r.errors), {"method": r.method}))
            rows.append((f"{prefix}_duration_seconds", max(0.0, r.seconds), {"method": r.method}))
    rows.append(("pykata_shim_events_sent", float(owner.events_sent), {}))
    rows.append(("pykata_shim_events_dropped", float(owner.events_dropped), {}))
    return rows


def _pss(pid: int) -> int:
    """The VMM's PSS. The kernel walks every page table of the guest's RAM for it (~20 ms for a 2 GiB
    VM here), the one expensive host figure: hence run in a thread and cached (pss_max_age)."""
    return int(psutil.Process(pid).memory_full_info().pss)


# What a guest image older than GetGuestMetrics (agent protocol 2) still tells, through GetGuestDetails.
DETAILS_FAMILIES = ("pykata_guest_online_cpus", "pykata_guest_memory_total_bytes")


class SandboxProbe:
    """One sandbox, collected again and again over one connection to its owner's agent proxy (reopened
    after a failure: a hung guest's requests are not left queued on it)."""

    def __init__(self, directory: Path, record: state.SandboxRecord) -> None:
        self.directory = directory
        self.record = record
        self._sandbox: AttachedSandbox | None = None
        self.old_agent = False  # it answered GetGuestMetrics UNIMPLEMENTED: ask GetGuestDetails instead
        # the guest's clocks at the last collection: the next one's tell a dead timer tick at no cost of
        # its own (Agent.connect checks the tick once, when the host connects; this keeps checking it)
        self._clocks: GuestClocks | None = None

    async def _metrics(self, sb: AttachedSandbox, timeout: float) -> agent_pb2.GuestMetrics:
        if not self.old_agent:
            try:
                return await sb.guest_metrics(timeout=timeout)
            except AgentCallError as e:
                if e.code != Code.UNIMPLEMENTED:
                    raise
                self.old_agent = True
        details = await sb.guest_details()
        return agent_pb2.GuestMetrics(online_cpus=details.online_cpus,
                                      memory=agent_pb2.GuestMemory(total=details.mem_total_bytes))

    async def _connection(self) -> AttachedSandbox:
        if self._sandbox is None:
            self._sandbox = await AttachedSandbox.attach(Found(self.directory, self.record))
        return self._sandbox

    async def guest(self, timeout: float, vcpus: int | None,
                    memory: int | None) -> list[tuple[str, float, dict[str, str]]]:
        """The guest's rows. Raises PykataError (AgentError, BadGuestValue), TimeoutError, OSError; the
        connection is closed then."""
        try:
            sb = await self._connection()
            running = [c.id for c in self.record.containers.values() if c.status == "running"]
            running = running[:MAX_CONTAINERS_SCRAPED]
            # one connection multiplexes the calls: the guest answers them concurrently
            metrics, stats, clocks = await asyncio.gather(
                self._metrics(sb, timeout), asyncio.gather(*(sb.stats_container(c, timeout=timeout) for c in running)),
                sb.guest_clocks(timeout=timeout))
            rows = _guest_rows(metrics, list(zip(running, stats, strict=True)), vcpus, memory)
            rows += self._tick_rows(clocks)
            if self.old_agent:  # only what GetGuestDetails told: no zeros standing in for the rest
                rows = [r for r in rows if r[0] in DETAILS_FAMILIES or r[0].startswith("pykata_guest_container_")]
            return rows
        except BaseException:
            await self.close()
            raise

    def _tick_rows(self, clocks: GuestClocks | None) -> list[tuple[str, float, dict[str, str]]]:
        """pykata_guest_tick_stalled from this collection's clocks and the last one's (none before a
        second collection, or from an agent that sends no clocks)."""
        previous, self._clocks = self._clocks, clocks
        if previous is None or clocks is None or clocks.clock_ns < previous.clock_ns:  # a restored snapshot
            return []
        stalled = tick_stalled(previous, clocks)
        if stalled:
            log.warning("sandbox %s: the guest has no timer tick (its coarse clock stood at %d ns for %.1f s)",
                        self.record.id, clocks.tick_clock_ns, (clocks.clock_ns - previous.clock_ns) / 1e9)
        return [("pykata_guest_tick_stalled", float(stalled), {})]

    async def owner(self, timeout: float) -> list[tuple[str, float, dict[str, str]]]:
        """The owner's rows. Raises PykataError, TimeoutError, OSError."""
        sb = await self._connection()
        return _owner_rows(await sb.owner_metrics(timeout=timeout))

    async def close(self) -> None:
        if self._sandbox is not None:
            sb, self._sandbox = self._sandbox, None
            with contextlib.suppress(Exception):
                await sb.close()


class Scraper:
    """Collects the sandboxes of one runtime directory; keeps a connection per sandbox and error counters
    across collections.

    `pss_max_age`: seconds a VMM's PSS is reused before it is read again (0: every collection)."""

    def __init__(self, config: Config, *, timeout: float = DEFAULT_TIMEOUT, pss_max_age: float = PSS_MAX_AGE) -> None:
        self.config = config
        self.timeout = timeout
        self.pss_max_age = pss_max_age
        self.errors: dict[tuple[str, str], int] = {}
        self._pss: dict[str, tuple[float, int]] = {}  # sandbox id -> (when read, PSS)
        self._probes: dict[str, SandboxProbe] = {}

    async def _vmm_pss(self, record: state.SandboxRecord) -> int | None:
        cached = self._pss.get(record.id)
        if cached and time.monotonic() - cached[0] < self.pss_max_age:
            return cached[1]
        if not record.vmm_pid:
            return None
        try:
            value = await asyncio.to_thread(_pss, record.vmm_pid)
        except psutil.Error:
            return None
        self._pss[record.id] = (time.monotonic(), value)
        return value

    def _error(self, sandbox_id: str, stage: str) -> None:
        self.errors[(sandbox_id, stage)] = self.errors.get((sandbox_id, stage), 0) + 1

    def _probe(self, directory: Path, record: state.SandboxRecord) -> SandboxProbe:
        probe = self._probes.get(record.id)
        if probe is None:
            probe = self._probes[record.id] = SandboxProbe(directory, record)
        probe.record = record  # its containers change
        return probe

    async def _one(self, directory: Path, record: state.SandboxRecord) -> Sample | None:
        start = time.perf_counter()
        sample = Sample(record.id)
        try:
            vcpus, memory = _host(sample, record)
        except psutil.Error:
            self._error(record.id, "host")
            return None  # its owner or VMM is gone: it drops out
        probe = self._probe(directory, record)
        pss = asyncio.ensure_future(self._vmm_pss(record))
        guest, owner = await asyncio.gather(
            asyncio.wait_for(probe.guest(self.timeout, vcpus, memory), self.timeout),
            asyncio.wait_for(probe.owner(self.timeout), self.timeout), return_exceptions=True)
        up = 0
        if isinstance(guest, list):
            up = 1
            for name, value, labels in guest:  # all or nothing: a bad value drops the guest's whole answer
                sample.add(name, value, **labels)
        elif isinstance(guest, (PykataError, TimeoutError, OSError)):
            log.debug("sandbox %s: guest collection failed: %s", record.id, guest)
            self._error(record.id, "agent")
        elif isinstance(guest, BaseException):
            raise guest
        if isinstance(owner, list):
            for name, value, labels in owner:
                sample.add(name, value, **labels)
        elif isinstance(owner, (PykataError, TimeoutError, OSError)):
            log.debug("sandbox %s: owner collection failed: %s", record.id, owner)
            self._error(record.id, "owner")
        elif isinstance(owner, BaseException):
            raise owner
        sample.add("pykata_hypervisor_proportional_memory_bytes", await pss)
        if not record.owner_alive() or (record.vmm_pid and not psutil.pid_exists(record.vmm_pid)):
            return None  # died during the collection: no half-sandbox in the output
        sample.add("pykata_agent_up", up)
        sample.add("pykata_monitor_scrape_duration_seconds", time.perf_counter() - start)
        return sample

    async def collect(self) -> dict[str, Sample]:
        """One collection: every running sandbox's samples, by id (sandboxes that died meanwhile left out)."""
        found = status.running(self.config)
        ids = {rec.id for _, rec in found}
        # what belongs to sandboxes that are gone is forgotten: a long-running monitor must not grow
        self.errors = {k: n for k, n in self.errors.items() if k[0] in ids}
        self._pss = {k: v for k, v in self._pss.items() if k in ids}
        for sid in [s for s in self._probes if s not in ids]:
            await self._probes.pop(sid).close()
        results = await asyncio.gather(*(self._one(d, rec) for d, rec in found))
        return {s.sandbox_id: s for s in results if s is not None}

    def families(self, samples: dict[str, Sample], ages: dict[str, float] | None = None,
                 errors: dict[tuple[str, str], int] | None = None) -> dict[str, Family]:
        """Every family (empty ones included, so a scrape with no sandbox still describes them)."""
        families = {name: Family(kind, help_) for name, (kind, help_) in FAMILIES.items()}
        for s in samples.values():
            for name, labels, value in s.rows:
                families[name].samples.append((labels, value))
        for sid, age in (ages or {}).items():
            families["pykata_monitor_sample_age_seconds"].samples.append(((("sandbox_id", sid),), age))
        families["pykata_monitor_sandboxes"].samples.append(((), float(len(samples))))
        for (sid, stage), n in sorted((self.errors if errors is None else errors).items()):
            families["pykata_monitor_scrape_errors"].samples.append(
                ((("sandbox_id", sid), ("stage", stage)), float(n)))
        return families

    async def scrape(self) -> dict[str, Family]:
        """Collect now and return every family (what `pykata monitor` did per request before it collected
        in the background; tests and benchmarks use it)."""
        start = time.perf_counter()
        families = self.families(await self.collect())
        families["pykata_monitor_scrape_seconds"].samples.append(((), time.perf_counter() - start))
        return families

    async def close(self) -> None:
        for probe in self._probes.values():
            await probe.close()
        self._probes.clear()
