"""The pod's VM follows its containers: it grows when one joins or raises its limits, shrinks when one
leaves or lowers them (pykata.resources.sizing.PodResources), and the host cgroup pykata owns follows
the VM (grown before the VM grows, shrunk after it shrank), so what bounds the VM on the host never
depends on the guest doing what it was asked."""

from __future__ import annotations

import logging
from typing import Any

from pykata.config import Config
from pykata.errors import InvalidArgument, PykataError
from pykata.resources import cgroups, sizing
from pykata.shim.tasks.state import TaskState

log = logging.getLogger("pykata.shim")


async def container_joined(st: TaskState, container_id: str, spec: dict[str, Any]) -> None:
    """Count a new container's limits and size the VM (and the host cgroup) for the pod. A pod asking
    for more than the VM's ceiling gets the ceiling (logged): the container's own limits still hold
    in the guest. Raises InvalidArgument naming a bad limit, HypervisorError / AgentError."""
    st.resources.containers[container_id] = sizing.pod_limits(spec)
    await resize_pod(st, strict=False)


def leaving_resizes(st: TaskState, container_id: str) -> bool:
    """Whether the pod's size changes when this container leaves (only one with limits of its own
    above what the pod's annotations cover changes it)."""
    if container_id not in st.resources.containers:
        return False
    others = {k: v for k, v in st.resources.containers.items() if k != container_id}
    before = st.resources.target()
    after = sizing.PodResources(st.resources.annotations, others).target()
    return (before.vcpus, before.memory_mib) != (after.vcpus, after.memory_mib)


async def container_left(st: TaskState, container_id: str) -> None:
    """Stop counting a container and shrink the VM. Never raises (logged): a VM that cannot shrink
    keeps running at its size."""
    if st.resources.containers.pop(container_id, None) is None:
        return
    if st.sandbox is None or st.sandbox_stopping or st.vm_dead:
        return
    try:
        await resize_pod(st, strict=False)
    except PykataError as e:
        log.warning("container %s left; the VM keeps its size: %s", container_id, e)


async def container_updated(st: TaskState, container_id: str, resources: dict[str, Any]) -> None:
    """A container's new `linux.resources` (UpdateTask): resize the VM for the pod.

    Raises:
        InvalidArgument: a bad value, or a pod that would need more than the VM's ceiling (naming
            the field), before anything changes.
        HypervisorError / AgentError: the resize failed.
    """
    if container_id not in st.resources.containers:
        return
    new = sizing.resources_size(resources)
    old = st.resources.containers[container_id]
    # UpdateContainerResources carries every field; one without a limit keeps the old one
    merged = sizing.PodSize(new.vcpus or old.vcpus, new.memory_mib or old.memory_mib,
                            new.vcpus_source, new.memory_source)
    st.resources.containers[container_id] = merged
    try:
        await resize_pod(st, strict=True)
    except InvalidArgument:
        st.resources.containers[container_id] = old
        raise


def grows(st: TaskState, container_id: str, resources: dict[str, Any]) -> bool:
    """Whether `resources` asks for more memory or CPU than the container counted so far. Raises
    InvalidArgument naming a bad value."""
    new = sizing.resources_size(resources)
    old = st.resources.containers.get(container_id, sizing.PodSize())
    return (new.memory_mib or 0) > (old.memory_mib or 0) or (new.vcpus or 0) > (old.vcpus or 0)


async def resize_pod(st: TaskState, *, strict: bool) -> tuple[int, int]:
    """Size the VM to `st.resources.target()` (the default size when no container has limits),
    within what the VM can have; return (memory MiB, vCPUs). `strict`: beyond the ceiling is an
    InvalidArgument instead of the ceiling. Raises as Sandbox.resize."""
    sb = st.running_sandbox()
    vm = sb.vm
    assert vm is not None
    q = sb.config.qemu
    target = st.resources.target()
    memory = target.memory_mib or q.default_memory
    vcpus = min(target.vcpus or q.default_vcpus, vm.max_vcpus)
    if memory > vm.memory_ceiling_mib:
        if strict:
            raise InvalidArgument(target.memory_source, f"the pod would need a VM of {memory} MiB, more than "
                                  f"its ceiling {vm.memory_ceiling_mib} MiB (hypervisor.qemu.default_maxmemory)")
        log.warning("the pod asks for a VM of %d MiB; it stays at its ceiling %d MiB "
                    "(hypervisor.qemu.default_maxmemory)", memory, vm.memory_ceiling_mib)
        memory = vm.memory_ceiling_mib
    if q.machine_type == "q35":
        memory = max(memory, vm.memory_mib)  # DIMMs are not unplugged
    async with st.resize_lock:
        grow = memory > vm.memory_mib or vcpus > vm.vcpus
        if grow:  # the VM does not grow past a cap that could not be raised
            _host_limits(st, max(memory, vm.memory_mib), max(vcpus, vm.vcpus))
        size = await sb.resize(memory_mib=memory, vcpus=vcpus)
        # never above the cap set before: one that cannot be narrowed keeps that wider one (logged)
        _host_limits(st, *size, narrowing=True)
        return size


def boot_limits(st: TaskState, config: Config) -> None:
    """Before the VM boots: cap the sandbox's own cgroup at the most the VM may ever be (its boot memory:
    the balloon's ceiling; default_maxvcpus), so not even a guest that ignores its balloon from the
    first instruction gets more; resize_pod then narrows it to the pod's size.

    Raises CgroupError (the cgroup and the cause) when the cap cannot be set, unless
    runtime.allow_uncharged_sandbox (then logged): a VM in a cgroup without its cap is charged to no
    limit of its size, as one left outside its cgroup, which join_cgroup refuses the same way."""
    q = config.qemu
    _host_limits(st, q.balloon_memory() or q.default_memory, q.resolved_maxvcpus(), config=config)


def _host_limits(st: TaskState, memory_mib: int, vcpus: int, *, config: Config | None = None,
                 narrowing: bool = False) -> None:
    """Cap the sandbox's own host cgroup at the VM's size plus the host overhead (never the pod's
    cgroup: kubelet sets that one from the pod's requests and the RuntimeClass overhead).

    Raises CgroupError when the kernel refuses the cap, unless runtime.allow_uncharged_sandbox or
    `narrowing` (a cap at most the one in force: that one stays, a bound still): logged then."""
    if st.cgroup is None:
        return
    cg, cg_config = st.cgroup
    if not cg.owned:
        return
    vm = st.sandbox.vm if st.sandbox is not None else None
    # before boot the accelerator is not decided yet: TCG's translation cache is allowed for
    tcg = getattr(getattr(vm, "accel", None), "accel", "tcg") == "tcg"
    limit_mib = memory_mib + sizing.host_memory_overhead_mib(config or cg_config, tcg=tcg)
    quota = sizing.host_cpu_quota_us(vcpus)
    try:
        cg.set_limits(memory_bytes=limit_mib * sizing.MIB, cpu_quota_us=quota, cpu_period_us=sizing.DEFAULT_CPU_PERIOD)
    except cgroups.CgroupError as e:
        if narrowing:
            log.warning("host cgroup limits not narrowed to the VM's size, the wider ones stay: %s", e)
        elif (config or cg_config).runtime.allow_uncharged_sandbox:
            log.warning("runtime.allow_uncharged_sandbox: the sandbox's host cgroup is not capped at the VM's "
                        "size: %s", e)
        else:
            raise
