"""One scrape of every running sandbox: host figures from /proc, guest figures from its agent.

A sandbox is found by its record (pykata.sandbox.status); its owner process (the shim, or `pykata run`)
and its VMM are read with psutil; its agent is reached through the owner's agent proxy
(`AttachedSandbox`), with a deadline per sandbox so one hung guest cannot stall the scrape. The guest is
untrusted: agentapi already bounds each reply (sizes, counts, text); here every number it sends must
also lie in [0, GUEST_VALUE_MAX] or the sample is dropped and counted as an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pykata.config import Config
from pykata.errors import PykataError
from pykata.sandbox import state, status
from pykata.sandbox.lookup import Found
from pykata.sandbox.remote import AttachedSandbox

log = logging.getLogger(__name__)

GUEST_VALUE_MAX = 1 << 60      # no honest counter of a VM gets near this (1 EiB, 36 years of ns)
MAX_CONTAINERS_SCRAPED = 64    # from the host's record, not the guest; bounds one sandbox's RPCs
DEFAULT_TIMEOUT = 2.0
PSS_MAX_AGE = 30.0

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
    "pykata_agent_up": ("gauge", "1 when the agent answered this scrape in time and in contract, else 0."),
    "pykata_guest_online_cpus": ("gauge", "CPUs online in the guest (agent GetGuestDetails)."),
    "pykata_guest_memory_total_bytes": ("gauge", "MemTotal of the guest (agent GetGuestDetails)."),
    "pykata_guest_container_cpu_seconds": ("counter", "CPU time of a container's cgroup in the guest."),
    "pykata_guest_container_memory_usage_bytes": ("gauge", "Memory usage of a container's cgroup in the guest."),
    "pykata_guest_container_pids": ("gauge", "Tasks in a container's cgroup in the guest."),
    "pykata_guest_network_receive_bytes": ("counter", "Bytes received by a guest interface."),
    "pykata_guest_network_transmit_bytes": ("counter", "Bytes sent by a guest interface."),
    "pykata_guest_network_receive_packets": ("counter", "Packets received by a guest interface."),
    "pykata_guest_network_transmit_packets": ("counter", "Packets sent by a guest interface."),
    "pykata_monitor_sandboxes": ("gauge", "Running sandboxes found by the last scrape."),
    "pykata_monitor_scrape_duration_seconds": ("gauge", "Wall time of the last scrape of one sandbox."),
    "pykata_monitor_scrape_seconds": ("gauge", "Wall time of the last whole scrape."),
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
    if record.id not in " ".join(argv):  # the pid was reused: not our VMM any more
        raise psutil.NoSuchProcess(record.vmm_pid)
    vmm = status.process_info(record.vmm_pid, io=True)
    vcpus, memory_mib, _ = status.vm_shape(argv)
    sample.add("pykata_hypervisor_cpu_seconds", vmm.cpu_seconds)
    sample.add("pykata_hypervisor_resident_memory_bytes", vmm.rss_bytes)
    sample.add("pykata_hypervisor_threads", vmm.threads)
    sample.add("pykata_hypervisor_open_fds", vmm.fds)
    sample.add("pykata_hypervisor_io_read_bytes", vmm.read_bytes)
    sample.add("pykata_hypervisor_io_write_bytes", vmm.write_bytes)
    sample.add("pykata_hypervisor_vcpus", vcpus)
    memory = None if memory_mib is None else memory_mib << 20
    sample.add("pykata_hypervisor_memory_bytes", memory)
    return vcpus, memory


PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT
CPUS_MAX = 8192    # Linux's largest NR_CPUS


async def _guest_figures(sample: Sample, found: Found, vcpus: int | None = None,
                         memory_bytes: int | None = None) -> None:
    """What the agent tells of the guest, within what the host knows of the VM (its vCPUs and memory
    from QEMU's command line; hot-plug may add up to 4x). Raises PykataError (AgentError, BadGuestValue)."""
    max_cpus = 4 * vcpus if vcpus else CPUS_MAX
    max_mem = 4 * memory_bytes if memory_bytes else GUEST_VALUE_MAX
    rows: list[tuple[str, float, dict[str, str]]] = []
    async with await AttachedSandbox.attach(found) as sb:
        running = [c.id for c in found.record.containers.values() if c.status == "running"]
        running = running[:MAX_CONTAINERS_SCRAPED]
        # one connection multiplexes the calls: the guest answers them concurrently
        details, all_stats = await asyncio.gather(
            sb.guest_details(), asyncio.gather(*(sb.stats_container(c) for c in running)))
    rows.append(("pykata_guest_online_cpus", _guest("online_cpus", details.online_cpus, max_cpus), {}))
    rows.append(("pykata_guest_memory_total_bytes", _guest("mem_total_bytes", details.mem_total_bytes, max_mem), {}))
    for i, (cid, stats) in enumerate(zip(running, all_stats, strict=True)):
        cg = stats.cgroup_stats
        labels = {"container_id": cid}
        rows.append(("pykata_guest_container_cpu_seconds",
                     _guest("cpu.usage_total_ns", cg.cpu.usage_total_ns) / 1e9, labels))
        rows.append(("pykata_guest_container_memory_usage_bytes",
                     _guest("memory.usage", cg.memory.usage, max_mem), labels))
        rows.append(("pykata_guest_container_pids", _guest("pids.current", cg.pids.current, PID_MAX), labels))
        if i == 0:  # the interfaces are the guest's, the same in every container's answer
            for n in stats.network_stats:
                iface = {"interface": n.name}
                rows.append(("pykata_guest_network_receive_bytes", _guest("rx_bytes", n.rx_bytes), iface))
                rows.append(("pykata_guest_network_transmit_bytes", _guest("tx_bytes", n.tx_bytes), iface))
                rows.append(("pykata_guest_network_receive_packets", _guest("rx_packets", n.rx_packets), iface))
                rows.append(("pykata_guest_network_transmit_packets", _guest("tx_packets", n.tx_packets), iface))
    for name, value, labels in rows:  # all or nothing: a bad value drops the guest's whole answer
        sample.add(name, value, **labels)


def _pss(pid: int) -> int:
    """The VMM's PSS. The kernel walks every page table of the guest's RAM for it (~20 ms for a 2 GiB
    VM here), the one expensive figure of a scrape: hence run in a thread and cached (pss_max_age)."""
    return int(psutil.Process(pid).memory_full_info().pss)


class Scraper:
    """Scrapes the sandboxes of one runtime directory; keeps error counters across scrapes.

    `pss_max_age`: seconds a VMM's PSS is reused before it is read again (0: every scrape)."""

    def __init__(self, config: Config, *, timeout: float = DEFAULT_TIMEOUT, pss_max_age: float = PSS_MAX_AGE) -> None:
        self.config = config
        self.timeout = timeout
        self.pss_max_age = pss_max_age
        self.errors: dict[tuple[str, str], int] = {}
        self._pss: dict[str, tuple[float, int]] = {}  # sandbox id -> (when read, PSS)

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

    async def _one(self, directory: Path, record: state.SandboxRecord) -> Sample | None:
        start = time.perf_counter()
        sample = Sample(record.id)
        try:
            vcpus, memory = _host(sample, record)
        except psutil.Error:
            self._error(record.id, "host")
            return None  # its owner or VMM is gone: it drops out
        up = 0
        pss = asyncio.ensure_future(self._vmm_pss(record))
        try:
            await asyncio.wait_for(_guest_figures(sample, Found(directory, record), vcpus, memory), self.timeout)
            up = 1
        except (PykataError, TimeoutError, OSError) as e:
            log.debug("sandbox %s: guest scrape failed: %s", record.id, e)
            self._error(record.id, "agent")
        sample.add("pykata_hypervisor_proportional_memory_bytes", await pss)
        if not record.owner_alive() or (record.vmm_pid and not psutil.pid_exists(record.vmm_pid)):
            return None  # died during the scrape: no half-sandbox in the output
        sample.add("pykata_agent_up", up)
        sample.add("pykata_monitor_scrape_duration_seconds", time.perf_counter() - start)
        return sample

    async def scrape(self) -> dict[str, Family]:
        """Every family (empty ones included, so a scrape with no sandbox still describes them)."""
        start = time.perf_counter()
        found = status.running(self.config)
        ids = {rec.id for _, rec in found}
        # counters of sandboxes that are gone are forgotten: a long-running monitor must not grow
        self.errors = {k: n for k, n in self.errors.items() if k[0] in ids}
        self._pss = {k: v for k, v in self._pss.items() if k in ids}
        results = await asyncio.gather(*(self._one(d, rec) for d, rec in found))
        families = {name: Family(kind, help_) for name, (kind, help_) in FAMILIES.items()}
        alive = [s for s in results if s is not None]
        for s in alive:
            for name, labels, value in s.rows:
                families[name].samples.append((labels, value))
        families["pykata_monitor_sandboxes"].samples.append(((), float(len(alive))))
        for (sid, stage), n in sorted(self.errors.items()):
            families["pykata_monitor_scrape_errors"].samples.append(
                ((("sandbox_id", sid), ("stage", stage)), float(n)))
        families["pykata_monitor_scrape_seconds"].samples.append(((), time.perf_counter() - start))
        return families


def scrape_sync(scraper: Scraper) -> dict[str, Family]:
    """One scrape on a fresh event loop (the HTTP server's thread has none)."""
    return asyncio.run(scraper.scrape())
