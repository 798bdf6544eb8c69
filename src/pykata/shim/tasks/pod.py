"""The pod's sandbox as the shim owns it: booted by the first Create (in the pod's cgroup, sized by
pykata.resources.sizing), watched (VM death, OOM events), stopped when the last container goes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from pykata.agentapi import AgentCallError
from pykata.config import Config, load_for_annotations
from pykata.errors import (
    ConfigError,
    InvalidArgument,
    PykataError,
)
from pykata.fsutil import descendants
from pykata.network import NetworkError, PoolMismatch, spec_netns
from pykata.protocols import events_pb2
from pykata.resources import cgroups, sizing
from pykata.sandbox import Sandbox, sandboxes_dir, state
from pykata.sandbox.lookup import remove_sandbox_dir
from pykata.sandbox.sandbox import boot_size
from pykata.shim.errors import agent_errors
from pykata.shim.tasks import exits, resize
from pykata.shim.tasks.model import VM_GONE_STATUS
from pykata.shim.tasks.state import TaskState
from pykata.timing import mark
from pykata.ttrpc import Code

log = logging.getLogger("pykata.shim")
LEFTOVER_WAIT = 10.0  # a previous shim of the same id gets this long to finish exiting
# Seconds between two GetOOMEvent calls, at least: the guest chooses when each returns.
OOM_POLL_INTERVAL = 0.1


def _log_count(n: int) -> bool:
    """Whether the `n`th of a repeated guest report goes into the host's log (1, 10, 100, every 1000th)."""
    return n in (1, 10, 100) or n % 1000 == 0
# After a pod took a pooled VM, its replacement starts this much later: not while the pod is starting.
REFILL_DELAY = 1.0


async def ensure_sandbox(st: TaskState, spec: dict[str, Any]) -> Sandbox:
    async with st.sandbox_lock:
        if st.sandbox is not None:
            return st.running_sandbox()
        annotations = spec.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise InvalidArgument("config.json annotations", "must be an object")
        with agent_errors(f"sandbox {st.sandbox_id}"):
            config = st.load_config({str(k): str(v) for k, v in annotations.items()})
            await _remove_dead_leftover(config, st.sandbox_id)
            config, vcpus, memory_mib = _vm_size(spec, config)
            # the pod's annotations; each container is counted as it joins (resize.container_joined)
            st.resources = sizing.PodResources.of_pod(spec)
            warm, st.warm = st.warm, None
            if warm is not None:
                adopted = await _try_warm(st, warm, config, vcpus, memory_mib, spec)
                if adopted is not None:
                    return adopted
            join_cgroup(st, config, spec)
            try:
                resize.boot_limits(st, config)
                log.info("booting the sandbox VM (vcpus=%s memory=%s MiB)", vcpus or "default",
                         memory_mib or "default")
                st.sandbox = await Sandbox.create(
                    st.sandbox_id, config=config, vcpus=vcpus, memory_mib=memory_mib,
                    hostname=str(spec.get("hostname") or ""), serve_proxy=True,
                    # a shim claimed from the pool has the pod's namespace as an fd (its mount namespace
                    # may not have the pod's mount)
                    netns=spec_netns(spec) and (st.warm_netns or spec_netns(spec)),
                    # as a pooled VM: QEMU, virtiofsd and the 9p helper die with this shim however it
                    # dies, and a reaper removes the mounts, directory and cgroups it leaves then,
                    # whether or not containerd's `delete` gets to run within its 5 s
                    die_with_owner=True)
            except BaseException:
                leave_cgroup(st)
                raise
        return _watch(st, st.sandbox)


def _watch(st: TaskState, sb: Sandbox) -> Sandbox:
    st.sandbox_stopping = False
    st.vm_dead = False
    st.spawn(watch_vm(st, sb), "watch-vm")
    st.spawn(watch_oom(st, sb), "watch-oom")
    log.info("sandbox VM running (qemu pid %s)", sb.vm.pid if sb.vm else None)
    return sb


def _why_not_warm(warm: Sandbox, config: Config, vcpus: int | None, memory_mib: int | None,
                  spec: dict[str, Any], netns: str | None) -> tuple[str | None, tuple[int | None, int | None]]:
    """Why the pod cannot take the pooled VM (None: it can), and the size to give it after hand-out.
    It can when its configuration is the pool's (its annotations changed nothing), its size is one the
    template's VM is resized to after restore anyway (boot_size: a fresh clone would be resized the
    same way), and its network is the VM's kind: a network namespace for a VM with a NIC, none for one
    without (factory.pool_nics)."""
    if config != warm.config:
        return "its configuration differs (annotations, or a size that boots cold)", (None, None)
    booted, resize_to = boot_size(config, vcpus, memory_mib)
    if booted != warm.config:
        return "its size needs a VM booted at that size", (None, None)
    wants_nic = spec_netns(spec) is not None and config.runtime.internetworking_model != "none"
    if wants_nic != (warm.warm_nics == 1) or (wants_nic and netns is None):
        return (f"the pod {'has a' if wants_nic else 'has no'} network namespace and the pooled VM "
                f"{warm.warm_nics} NICs"), (None, None)
    return None, resize_to


async def _try_warm(st: TaskState, warm: Sandbox, config: Config, vcpus: int | None, memory_mib: int | None,
                    spec: dict[str, Any]) -> Sandbox | None:
    """The pod takes the pooled VM this shim was claimed with, or None (the VM is stopped and the
    reason logged) when the pod does not fit it: the caller boots one the normal way."""
    netns = st.warm_netns
    why, resize_to = _why_not_warm(warm, config, vcpus, memory_mib, spec, netns)
    if why is None:
        try:
            return await _adopt_warm(st, warm, config, spec, resize_to, netns if warm.warm_nics else None)
        except PoolMismatch as e:
            why = str(e)
        except NetworkError as e:
            log.warning("the pooled VM's NIC could not be wired to the pod's network: %s", e)
            why = "its NIC could not be wired"
        except (cgroups.CgroupError, InvalidArgument):
            # the pod fails (join_cgroup: its cgroup, or a refused linux.cgroupsPath; _vm_into_cgroup):
            # its pooled VM is not left running, and the cgroup, if made, is removed once the VM's
            # processes are gone
            await warm.stop(remove=True)
            leave_cgroup(st)
            raise
    log.info("the pooled VM does not fit this pod (%s): booting one", why)
    await warm.stop(remove=True)
    return None


async def _adopt_warm(st: TaskState, warm: Sandbox, config: Config, spec: dict[str, Any],
                      resize_to: tuple[int | None, int | None], netns: str | None) -> Sandbox:
    """The pod takes the pooled VM this shim was claimed with: its processes join the pod's cgroup,
    and the guest is set up for it, on the pod's network, and sized (Sandbox.adopt). Refills the pool
    in the background. On failure the VM is stopped."""
    mark("vm.start")

    def into_cgroup() -> None:
        # The reaper first, while the shim is outside the pod's cgroup (a cold boot's reaper leaves it;
        # here it is never in it, nor below the shim when its descendants follow the shim): if this
        # shim dies with the pod up, it removes the pool directory, the sandboxes/<id> link and the
        # pod's cgroups, as a cold-booted VM's reaper does (the VM's processes die by its lifeline,
        # the mounts with this process's mount namespace once the reaper, in it, has undone them).
        warm.start_reaper(adopted_as=st.sandbox_id)
        join_cgroup(st, config, spec)
        resize.boot_limits(st, config)
        mark("vm.joined")
        _vm_into_cgroup(st, config)

    # The pod's cgroup is made, the shim joins it, its limits are set and the VM's processes follow,
    # all beside the hand-out, not before it: under cgroup v1 each of the ~50 moves (every process in
    # every hierarchy) may wait for an RCU grace period, 10-30 ms in all on the pooled start's path,
    # and making the cgroup in each hierarchy, joining it and its limits another ~25 ms (bench/phases.py
    # --pool, load 7.5). The guest runs nothing of the pod until the pod's first container is created,
    # after all of it.
    moving = asyncio.ensure_future(asyncio.to_thread(into_cgroup))
    log.info("taking the VM from the warm pool (%s)", warm.dir.name)
    try:
        await warm.adopt(st.sandbox_id, hostname=str(spec.get("hostname") or ""), serve_proxy=True,
                         resize_to=resize_to, netns=netns)
    except BaseException:
        with contextlib.suppress(BaseException):  # the moves end before the cgroup is removed
            await asyncio.shield(moving)
        leave_cgroup(st)
        raise
    await moving  # a CgroupError or InvalidArgument: _try_warm stops the VM, then leaves the cgroup
    mark("vm.cgroup")
    st.sandbox = warm
    st.spawn(_refill_later(st, config), "refill-pool")
    return _watch(st, warm)


def _vm_into_cgroup(st: TaskState, config: Config) -> None:
    """Move every process below the shim (the pooled VM's QEMU, its lifeline wrappers and helpers)
    into the sandbox's cgroup, which the shim joined.

    Raises CgroupError when one cannot be moved, unless runtime.allow_uncharged_sandbox (then it stays
    outside, logged), as join_cgroup."""
    if st.cgroup is None:
        return
    cg = st.cgroup[0]
    try:
        for pid in descendants(os.getpid()):
            cg.add_process(pid)
    except cgroups.CgroupError as e:
        if not config.runtime.allow_uncharged_sandbox:
            raise
        log.warning("runtime.allow_uncharged_sandbox: the pooled VM stays outside the pod's cgroup: %s", e)


async def _refill_later(st: TaskState, config: Config) -> None:
    try:
        await asyncio.sleep(REFILL_DELAY)
    except asyncio.CancelledError:  # the shim is exiting first (a short pod): refill on the way out
        refill_pool(config, st)
        raise
    await asyncio.to_thread(refill_pool, config, st)  # it may wait for the pool's lock: not on the loop


def refill_pool(config: Config, st: TaskState | None = None) -> None:
    """Start waiting shims until the pool is full again (factory.pool.fill; never raises). Started by
    a pod's shim, each one leaves the pod's cgroup at once: a waiting VM is not the pod's, and would
    keep its cgroup from being removed."""
    from pykata.factory.pool import entry_argv, fill
    from pykata.shim.forkclient import pool_fork

    def not_the_pods(pid: int) -> None:
        if st is not None and st.cgroup is not None:
            st.cgroup[0].release_process(pid)

    # from the shims' fork server: its children have done their imports. None runs (it is launched
    # now for the next refills): the rest of this refill starts fresh processes. A server launched
    # now lives on after the pod: out of its cgroup (not_the_pods), or the cgroup stays behind.
    forked = None
    if st is not None and st.containerd_address and config.runtime.shim_fork_server:
        forked = pool_fork(config.runtime.runtime_dir, st.containerd_address, not_the_pods)
    fill(config, entry_argv(), not_the_pods, forked)


def join_cgroup(st: TaskState, config: Config, spec: dict[str, Any]) -> None:
    """Move the shim, and so the QEMU and virtiofsd it starts, into the sandbox's host cgroup
    (pykata.resources.cgroups): the pod's `linux.cgroupsPath` with runtime.sandbox_cgroup_only.

    Raises InvalidArgument naming linux.cgroupsPath when the pod's path is refused, and CgroupError
    (the cgroup's path and the cause) when it cannot be made or joined, unless
    runtime.allow_uncharged_sandbox: a VM outside the pod's cgroups is charged to no limit kubelet
    set, so a guest that ignores its balloon could use its boot memory beyond them (Kata fails such a
    pod too). Nothing is left made either way (cgroups.join)."""
    linux = spec.get("linux")
    spec_path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    try:
        cg = cgroups.join(config.runtime, spec_path, st.sandbox_id)
    except cgroups.CgroupError as e:
        if e.field == cgroups.FIELD:
            raise InvalidArgument(e.field, str(e).removeprefix(f"{e.field}: ")) from None
        if not config.runtime.allow_uncharged_sandbox:
            raise
        log.warning("runtime.allow_uncharged_sandbox: the sandbox's processes stay in the shim's cgroup, "
                    "charged to no limit of the pod: %s", e)
        return
    st.cgroup = (cg, config)


def leave_cgroup(st: TaskState) -> None:
    """Once the VM is gone: the shim moves back out and the sandbox's cgroups are removed."""
    if st.cgroup is not None:
        cg, config = st.cgroup
        st.cgroup = None
        cgroups.leave(cg, config.runtime, st.sandbox_id)


async def stop_sandbox(st: TaskState) -> None:
    """Stop the VM (idempotent, shared by concurrent callers, bounded by the sandbox's own timeout).

    With no container left, nothing in the guest needs an orderly end (every process has ended,
    its files are written through to the host, the host mounts are undone): the agent is not
    asked to tear the guest down first, which under TCG costs a third of a second.
    """
    sb = st.sandbox
    if sb is None:
        return
    st.sandbox_stopping = True
    mark("vm.stop")
    await st.cancel_removals()
    if not st.containers:
        with contextlib.suppress(PykataError):
            await sb.disconnect_agent()
    await sb.stop(remove=True)
    mark("vm.stopped")


async def stop_if_unused(st: TaskState) -> None:
    """After a failed Create: a sandbox with no container is stopped, and the next Create boots anew."""
    if st.sandbox is not None and not st.containers and not st.creating:
        async with st.sandbox_lock:
            if st.containers or st.creating:
                return
            sb, st.sandbox = st.sandbox, None
            if sb is not None:
                st.sandbox_stopping = True
                await st.cancel_removals()
                await sb.stop(remove=True)
            leave_cgroup(st)


async def kill_vm(st: TaskState, why: str) -> None:
    """Stop the sandbox's VM (its processes are then recorded as killed, as when the VM dies)."""
    sb = st.sandbox
    if sb is None or sb.vm is None or st.vm_dead:
        return
    log.error("%s; stopping the sandbox VM", why)
    await sb.vm.stop()
    await asyncio.shield(sb.vm.exited)


async def watch_vm(st: TaskState, sb: Sandbox) -> None:
    assert sb.vm is not None
    with contextlib.suppress(Exception):
        await asyncio.shield(sb.vm.exited)
    if sb is not st.sandbox:
        return
    st.vm_dead = True
    if not st.sandbox_stopping:
        log.error("the sandbox VM exited unexpectedly; stopping every process with status %d",
                  VM_GONE_STATUS)
    for sc in list(st.containers.values()):
        for p in sc.processes():
            await exits.record_exit(st, sc, p, VM_GONE_STATUS)


async def watch_oom(st: TaskState, sb: Sandbox) -> None:
    failures = errors = ignored = 0
    kills: dict[str, int] = {}  # OOM kills reported, per container of the pod
    while not st.sandbox_stopping and not st.vm_dead:
        try:
            oom_cid = await sb.next_oom_event()
        except AgentCallError as e:
            if e.code in (Code.UNAVAILABLE, Code.UNIMPLEMENTED, Code.CANCELLED):
                return
            failures += 1
            errors += 1  # not reset by an answer in between: the guest chooses both
            if _log_count(errors):
                log.warning("GetOOMEvent: %s (%d errors so far)", e, errors)
            await asyncio.sleep(min(5.0, float(failures)))
            continue
        except PykataError:
            return
        failures = 0
        if oom_cid in st.containers:
            # a guest may report kills of a real container of the pod at every call, 10 a second for
            # the pod's life: the events are rate-limited by the publisher (pykata.shim.events), the log
            # lines here (the log is the host's too)
            n = kills[oom_cid] = kills.get(oom_cid, 0) + 1
            if _log_count(n):
                log.warning("container %s: OOM kill (%d so far)", oom_cid, n)
            st.publish(events_pb2.TaskOOM(container_id=oom_cid))
            for gone in [c for c in kills if c not in st.containers]:
                del kills[gone]
        elif oom_cid:
            # containerd would mark that container, of some other pod maybe, OOM-killed
            ignored += 1
            if _log_count(ignored):
                log.warning("the agent reported an OOM kill in %r, not a container of this pod: "
                            "ignored (%d so far)", oom_cid[:80], ignored)
        # The guest decides when GetOOMEvent returns: one answering at once, every time, must not
        # spin this loop (and the shim's CPU).
        await asyncio.sleep(OOM_POLL_INTERVAL)


def pod_config(annotations: dict[str, str]) -> Config:
    """The pod's configuration (load_for_annotations).

    Raises InvalidArgument naming the `io.katacontainers.*` annotation that is bad or not
    allowed (the pod's mistake); ConfigError for the host's own configuration file.
    """
    try:
        return load_for_annotations(annotations)
    except ConfigError as e:
        if not e.field.startswith("io.katacontainers."):
            raise
        raise InvalidArgument(e.field, str(e).removeprefix(f"{e.field}: ")) from None


def _vm_size(spec: dict[str, Any], config: Config) -> tuple[Config, int | None, int | None]:
    """The configuration, vCPUs and MiB (None: the default) for the sandbox VM, from the pod's sandbox
    annotations and the container's limits (pykata.resources.sizing: a VM larger than the configured one
    boots cold, without a template).

    Raises InvalidArgument naming the annotation or spec field with a bad value.
    """
    return sizing.fit(config, sizing.pod_size(spec))


async def _remove_dead_leftover(config: Config, sandbox_id: str) -> None:
    """Make room for the sandbox: a directory of the same id whose shim is still on its way out (the
    same container id run again right away) is waited for, one whose shim died is removed; one whose
    owner lives on is left alone (Sandbox.create then refuses the id)."""
    directory = sandboxes_dir(config) / sandbox_id
    deadline = time.monotonic() + LEFTOVER_WAIT
    while directory.exists() and time.monotonic() < deadline:
        record = state.load(directory)
        if record is None or not record.owner_alive():
            log.warning("removing sandbox %s left by a dead shim", sandbox_id)
            remove_sandbox_dir(directory, record)
            return
        await asyncio.sleep(0.05)
