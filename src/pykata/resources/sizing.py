"""How big a sandbox VM is: the one sizing policy of the shim, `pykata run` and the SDK.

Three ways in, one way out (`fit`):
- the shim: `pod_size(spec)`, from the pod's sandbox annotations and the container's limits (below);
- `pykata run --cpus/--memory`: `container_size(...)`, the same rule for one container's limits;
- the SDK's `cpus=` / `memory_mib=`: `vm_size(...)`, a VM size asked for as such.
`fit(config, size)` caps the vCPUs, refuses more memory than the VM may have (naming the field that
asked) and boots a VM larger than the configured one cold (see "VM templates" below).

The shim's sizing in detail:

containerd's CRI plugin (1.6.20 checked: pkg/cri/server/sandbox_run_linux.go) puts the pod's
resources on the sandbox (pause) container's spec when kubelet sends them in
`PodSandboxConfig.linux.resources` (kubelet >= 1.23 does: the sum of the containers' limits):

    io.kubernetes.cri.sandbox-cpu-period   CpuPeriod (µs, 0 when unset)
    io.kubernetes.cri.sandbox-cpu-quota    CpuQuota  (µs per period, 0 or -1 when unlimited)
    io.kubernetes.cri.sandbox-cpu-shares   CpuShares (a relative weight)
    io.kubernetes.cri.sandbox-memory       MemoryLimitInBytes (0 when unset)

The pause container itself has no limits. A container started by itself (`ctr run`, one container
per VM) has its limits in `linux.resources`. The VM gets what the larger of the two asks for:
ceil(quota / period) vCPUs and the memory limit plus VM_MEMORY_OVERHEAD_MIB for the guest kernel,
agent and page cache (as `pykata run`), never less than the configuration's default_vcpus and
default_memory (Sandbox.create takes the maximum). CPU shares are a weight between cgroups, not an
amount of CPU: they are checked but do not size the VM (Kata does the same).

The VM follows the pod while it runs (pykata.shim.tasks.resize): `PodResources` counts each container's
limits as it joins, changes (UpdateTask) and leaves; the VM is the larger of the annotations and the
containers' sum, plus VM_MEMORY_OVERHEAD_MIB. A microvm is resized through its balloon (memory, up to its
ceiling: max(default_memory, default_maxmemory)) and by onlining CPUs (up to default_maxvcpus); inside
the guest each container's own limits are still enforced by crun's cgroups.

VM templates: a template is one saved VM of the configured size and ceiling; a clone of it is sized right
after it wakes up (Sandbox.create's boot_size), so any VM up to the ceiling starts from the template. A VM
above the ceiling (or, on q35, above the configured size) boots cold at its size: each template costs a
~10 s boot to make and keeps its saved guest RAM (factory.template_path, a tmpfs by default) for as long
as it exists, and pod specs would otherwise decide how many there are.

The host overhead figures (HOST_*) are what bench/overhead_bench.py measured per pod; the shim caps the
sandbox's own host cgroup with them (the VM's size plus the overhead), and `pykata install runtimeclass`
prints them as a RuntimeClass's overhead.podFixed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pykata.config import Config
from pykata.errors import InvalidArgument
from pykata.hypervisor.qemu.balloon import MIN_MEMORY_MIB

log = logging.getLogger("pykata.resources")

SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_SHARES = "io.kubernetes.cri.sandbox-cpu-shares"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"

VM_MEMORY_OVERHEAD_MIB = 256
# Per sandbox on the host, beyond the guest's memory and vCPUs (bench/overhead_bench.py, 3 idle template
# clones with a 256 MiB container each, TCG, load average 7.5): PSS of the shim 23 MiB, of QEMU outside
# guest RAM 66 MiB (its heap and the translation cache filled so far), of the 9p helper 0.4 MiB: 90 MiB,
# rounded up to 128 for QEMU's heap under use; CPU of them all at idle 15 millicores (the idle guest's
# ticks included), rounded up to 100 for the shim's and QEMU's I/O work while the pod runs.
HOST_MEMORY_OVERHEAD_MIB = 128
HOST_CPU_OVERHEAD_MILLI = 100
TCG_DEFAULT_TB_MIB = 1024
DEFAULT_CPU_PERIOD = 100_000  # µs, the kernel's and kubelet's default
# cgroup limits: cpu.cfs_period_us is 1 ms .. 1 s; cpu.shares 2 .. 262144 (0: unset)
MIN_CPU_PERIOD, MAX_CPU_PERIOD = 1_000, 1_000_000
MAX_CPU_SHARES = 262_144
MAX_VALUE_LEN = 20  # an int64 in decimal; anything longer is not a number containerd wrote
MIB = 1 << 20


@dataclass(frozen=True)
class PodSize:
    """What a sandbox asks for; None means "the configuration's default". `*_source` name the
    annotation or spec field each value came from (for error messages)."""

    vcpus: int | None = None
    memory_mib: int | None = None
    vcpus_source: str = ""
    memory_source: str = ""


def _int(field: str, value: object) -> int:
    """An integer from a spec value or an annotation string. Raises InvalidArgument naming `field`."""
    if isinstance(value, bool):
        raise InvalidArgument(field, f"must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_VALUE_LEN:
        text = value.strip()
        digits = text[1:] if text.startswith("-") else text
        if digits.isascii() and digits.isdigit():
            return int(text)
    shown = value[:40] if isinstance(value, str) else value
    raise InvalidArgument(field, f"must be an integer, got {shown!r}")


def _vcpus(quota: int, period: int, quota_field: str, period_field: str) -> int | None:
    """ceil(quota / period), None when the quota means "unlimited" (0 or -1)."""
    if quota < -1:
        raise InvalidArgument(quota_field, f"{quota} is negative (-1 or 0 mean no limit)")
    if period == 0:
        period = DEFAULT_CPU_PERIOD
    elif not MIN_CPU_PERIOD <= period <= MAX_CPU_PERIOD:
        raise InvalidArgument(period_field, f"{period} µs is outside {MIN_CPU_PERIOD}..{MAX_CPU_PERIOD}")
    if quota <= 0:
        return None
    return math.ceil(quota / period)


def _memory_mib(limit: int, field: str) -> int | None:
    """The VM memory for a memory limit in bytes: None when unlimited (0 or -1)."""
    if limit < -1:
        raise InvalidArgument(field, f"{limit} is negative (-1 or 0 mean no limit)")
    if limit <= 0:
        return None
    return math.ceil(limit / MIB) + VM_MEMORY_OVERHEAD_MIB


def _from_annotations(annotations: Mapping[str, Any]) -> PodSize:
    values = {name: _int(name, annotations[name]) for name in
              (SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_CPU_SHARES, SANDBOX_MEMORY) if name in annotations}
    shares = values.get(SANDBOX_CPU_SHARES, 0)
    if not 0 <= shares <= MAX_CPU_SHARES:
        raise InvalidArgument(SANDBOX_CPU_SHARES, f"{shares} is outside 0..{MAX_CPU_SHARES}")
    vcpus = _vcpus(values.get(SANDBOX_CPU_QUOTA, 0), values.get(SANDBOX_CPU_PERIOD, 0),
                   SANDBOX_CPU_QUOTA, SANDBOX_CPU_PERIOD)
    memory = _memory_mib(values.get(SANDBOX_MEMORY, 0), SANDBOX_MEMORY)
    return PodSize(vcpus, memory, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY)


def _object(field: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be an object")
    return value


def _from_limits(spec: Mapping[str, Any]) -> PodSize:
    linux = _object("linux", spec.get("linux"))
    res = _object("linux.resources", linux.get("resources"))
    memory = _object("linux.resources.memory", res.get("memory"))
    cpu = _object("linux.resources.cpu", res.get("cpu"))
    limit_field, quota_field, period_field = ("linux.resources.memory.limit", "linux.resources.cpu.quota",
                                              "linux.resources.cpu.period")
    mem = _memory_mib(_int(limit_field, memory.get("limit") or 0), limit_field)
    vcpus = _vcpus(_int(quota_field, cpu.get("quota") or 0), _int(period_field, cpu.get("period") or 0),
                   quota_field, period_field)
    return PodSize(vcpus, mem, quota_field, limit_field)


def container_size(cpus: float | None, memory_bytes: int | None, *, cpus_source: str,
                   memory_source: str) -> PodSize:
    """What one container's limits ask for (`pykata run --cpus 1.5 --memory 512m`): ceil(cpus) vCPUs
    and the memory limit plus VM_MEMORY_OVERHEAD_MIB, as for a pod; None or 0 is no limit. Raises
    InvalidArgument naming the source of a negative value."""
    if cpus is not None and not cpus >= 0:
        raise InvalidArgument(cpus_source, f"{cpus} must not be negative")
    if memory_bytes is not None and memory_bytes < 0:
        raise InvalidArgument(memory_source, f"{memory_bytes} must not be negative")
    return PodSize(math.ceil(cpus) if cpus else None, _memory_mib(memory_bytes or 0, memory_source),
                   cpus_source, memory_source)


def vm_size(vcpus: int | None, memory_mib: int | None, *, vcpus_source: str, memory_source: str) -> PodSize:
    """A VM size asked for as such (the SDK's `cpus=`, `memory_mib=`): no overhead is added. Raises
    InvalidArgument naming the source of a value that is not a positive integer, or of memory below
    what a VM may have (the balloon's floor)."""
    for value, source in ((vcpus, vcpus_source), (memory_mib, memory_source)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InvalidArgument(source, f"{value!r} must be a positive integer")
    if memory_mib is not None and memory_mib < MIN_MEMORY_MIB:
        raise InvalidArgument(memory_source, f"{memory_mib} MiB is less than a VM may have ({MIN_MEMORY_MIB} MiB)")
    return PodSize(vcpus, memory_mib, vcpus_source, memory_source)


def pod_size(spec: Mapping[str, Any]) -> PodSize:
    """The size the first container's spec asks for (see the module docstring): the larger of the
    sandbox annotations and the spec's own limits, per resource.

    Raises:
        InvalidArgument: naming the annotation or spec field whose value is not an integer or
            is out of range.
    """
    annotations = _object("annotations", spec.get("annotations"))
    pod, own = _from_annotations(annotations), _from_limits(spec)
    vcpus, vcpus_source = max(((pod.vcpus or 0, pod.vcpus_source), (own.vcpus or 0, own.vcpus_source)),
                              key=lambda x: x[0])
    memory, memory_source = max(((pod.memory_mib or 0, pod.memory_source),
                                 (own.memory_mib or 0, own.memory_source)), key=lambda x: x[0])
    return PodSize(vcpus or None, memory or None, vcpus_source, memory_source)


def pod_limits(spec: Mapping[str, Any]) -> PodSize:
    """What one container's spec asks for with its own `linux.resources` (no annotations): ceil(quota /
    period) vCPUs, its memory limit plus VM_MEMORY_OVERHEAD_MIB. Raises InvalidArgument naming the field."""
    return _from_limits(spec)


def host_memory_overhead_mib(config: Config, *, tcg: bool) -> int:
    """What a sandbox uses on the host beyond its guest's memory (MiB), for the host cgroup's limit:
    HOST_MEMORY_OVERHEAD_MIB (measured), plus under TCG the translation cache QEMU may fill
    (hypervisor.qemu.tcg_tb_size, QEMU's 1 GiB when 0)."""
    extra = (config.qemu.tcg_tb_size or TCG_DEFAULT_TB_MIB) if tcg else 0
    return HOST_MEMORY_OVERHEAD_MIB + extra


def pod_fixed_overhead(config: Config, *, tcg: bool) -> tuple[int, int]:
    """A RuntimeClass's overhead.podFixed for this configuration: (MiB, millicores). Memory: the guest's
    own share of the VM (VM_MEMORY_OVERHEAD_MIB: kernel, agent, page cache) plus what the sandbox uses on
    the host beyond its guest (host_memory_overhead_mib); CPU: the host processes' idle use."""
    return VM_MEMORY_OVERHEAD_MIB + host_memory_overhead_mib(config, tcg=tcg), HOST_CPU_OVERHEAD_MILLI


def runtimeclass_yaml(handler: str, memory_mib: int, cpu_milli: int, accelerator: str) -> str:
    """The RuntimeClass manifest `pykata install runtimeclass` prints."""
    return (f"# RuntimeClass `{handler}`: overhead.podFixed measured per pod (bench/overhead_bench.py) for\n"
            f"# {accelerator}: the guest's own share of the VM ({VM_MEMORY_OVERHEAD_MIB} MiB), the shim, QEMU outside\n"
            f"# guest RAM and the file server on the host"
            + (", and TCG's translation cache (hypervisor.qemu.tcg_tb_size)" if accelerator == "tcg" else "")
            + ".\n"
            "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n"
            f"  name: {handler}\nhandler: {handler}\noverhead:\n  podFixed:\n"
            f'    memory: "{memory_mib}Mi"\n    cpu: "{cpu_milli}m"\n'
            "scheduling:\n  nodeSelector:\n    katacontainers.io/pykata-runtime: \"true\"\n")


def host_cpu_quota_us(vcpus: int, period_us: int = DEFAULT_CPU_PERIOD) -> int:
    """The host cgroup's CPU time per period for a VM of `vcpus`: one period per vCPU plus the
    measured idle use of the shim, QEMU's own threads and the file server (HOST_CPU_OVERHEAD_MILLI)."""
    return (vcpus * 1000 + HOST_CPU_OVERHEAD_MILLI) * period_us // 1000


def resources_size(resources: Mapping[str, Any], prefix: str = "linux.resources") -> PodSize:
    """What an OCI `linux.resources` object (a container's, or an UpdateContainer's) asks for, as
    `_from_limits` reads a spec's. Raises InvalidArgument naming the field."""
    return _from_limits({"linux": {"resources": dict(resources)}})


@dataclass
class PodResources:
    """What each container of a running pod asks for, and the VM size that makes (`target`).

    The pod's sandbox annotations (kubelet's sum of the containers' limits) are a floor; each
    container's own limits add up on top of one VM_MEMORY_OVERHEAD_MIB (so a container joining a pod
    whose annotations did not count it grows the VM by its limits, and leaving shrinks it). A pod with
    no limits at all gets the configured default size (None)."""

    annotations: PodSize = dataclasses.field(default_factory=PodSize)
    containers: dict[str, PodSize] = dataclasses.field(default_factory=dict)

    @classmethod
    def of_pod(cls, spec: Mapping[str, Any]) -> PodResources:
        """The pod's annotations, from the spec of the container that boots the VM (no container counted
        yet). Raises InvalidArgument naming the annotation."""
        return cls(_from_annotations(_object("annotations", spec.get("annotations"))))

    def target(self) -> PodSize:
        """The pod's VM size now (None: the configured default)."""
        raw = sum((c.memory_mib - VM_MEMORY_OVERHEAD_MIB) for c in self.containers.values() if c.memory_mib)
        summed_memory = raw + VM_MEMORY_OVERHEAD_MIB if raw else 0
        summed_vcpus = sum(c.vcpus or 0 for c in self.containers.values())
        memory = max(self.annotations.memory_mib or 0, summed_memory)
        vcpus = max(self.annotations.vcpus or 0, summed_vcpus)
        return PodSize(vcpus or None, memory or None, "the pod's containers' linux.resources.cpu",
                       "the pod's containers' linux.resources.memory.limit")


def fit(config: Config, size: PodSize) -> tuple[Config, int | None, int | None]:
    """The configuration to boot the VM with, and its vCPUs and memory (None: the default).

    More vCPUs than hypervisor.qemu.default_maxvcpus allows are cut to that (a quota beyond the
    host's CPUs cannot be used anyway). A VM larger than the configured default boots cold (no
    template; see the module docstring).

    Raises:
        InvalidArgument: the memory asked for is above hypervisor.qemu.default_maxmemory (the
            host's memory by default), naming the annotation or field that asked.
    """
    q = config.qemu
    vcpus, memory = size.vcpus, size.memory_mib
    if vcpus is not None and vcpus > (most := q.resolved_maxvcpus()):
        log.warning("%s asks for %d vCPUs; the VM gets hypervisor.qemu.default_maxvcpus = %d",
                    size.vcpus_source, vcpus, most)
        vcpus = most
    if memory is not None and memory > (limit := q.largest_vm_memory()):
        what = "hypervisor.qemu.default_maxmemory" if q.machine_type == "q35" else "the host's memory"
        raise InvalidArgument(size.memory_source, f"needs a VM of {memory} MiB, more than a VM may have "
                                                  f"({what}, {limit} MiB)")
    # A microvm is sized after boot (balloon up to its ceiling, CPUs onlined up to default_maxvcpus):
    # a template of the configured size carries it. Only beyond those does the VM boot at its size.
    ceiling = q.balloon_memory() or q.default_memory
    most_vcpus = q.resolved_maxvcpus() if q.machine_type == "microvm" else q.default_vcpus
    bigger = (vcpus or 0) > most_vcpus or (memory or 0) > ceiling
    if bigger and config.factory.enable_template:
        log.info("the VM (%s vCPUs, %s MiB) is larger than the template's (%d, %d MiB): it boots cold",
                 vcpus or q.default_vcpus, memory or q.default_memory, q.default_vcpus, q.default_memory)
        config = dataclasses.replace(config, factory=dataclasses.replace(config.factory, enable_template=False))
    return config, vcpus, memory
