"""A CRI pod's sandbox (pause) container, with no process in the guest until something needs one.

Under runc the pause process holds the pod's namespaces for its containers to join. In a VM the VM
holds them: the network is the VM's interface, and the agent gives the containers the guest's IPC and
host name (pykata.sandbox.ocispec.for_guest). A pause process in the guest would change nothing a
container can see, and starting it (crun create + start under TCG) is a good part of a pod's start. So
with runtime.sandbox_pause_in_guest = false (the default) the shim answers containerd for the sandbox
task alone: Create/Start/State/Pids/Wait from what it records, Kill with the exit status the pause
image would give (`exit_status`), Stats with zeros, Delete stops the VM as before.

The real pause is created and started in the guest when something needs it (`materialize`): a
container that shares the pod's pid namespace (CRI pid=POD: kubelet's shareProcessNamespace), which
must see the pause as its pid 1 as under runc, and an exec into the sandbox container. From then on
the sandbox task is an ordinary one. (Kata's agent likewise makes the pod's first container, its
pause, the holder of the sandbox's pid namespace that CreateContainer(sandbox_pidns) joins.)
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from pykata.config import Config
from pykata.errors import FailedPrecondition
from pykata.protocols.agent import agent_pb2
from pykata.shim.criannotations import CRI_CONTAINER_TYPE, CRIO_CONTAINER_TYPE, SANDBOX_TYPE
from pykata.shim.errors import agent_errors
from pykata.shim.stdio import ProcessIO, Stdio
from pykata.shim.tasks import exits
from pykata.shim.tasks.model import ShimContainer, rootfs_mounts
from pykata.shim.tasks.state import TaskState
from pykata.timing import mark

log = logging.getLogger("pykata.shim")
# What Kubernetes' pause does on a signal: exits 0 on SIGINT and SIGTERM (its handler), dies of
# SIGKILL (128 + 9); every other signal is ignored (it is its pid namespace's init, without a handler).
# CRI's StopPodSandbox only ever sends SIGKILL.
EXIT_ON_SIGNAL: dict[int, int] = {signal.SIGKILL: 128 + signal.SIGKILL, signal.SIGTERM: 0, signal.SIGINT: 0}


def is_pod_sandbox(spec: dict[str, Any]) -> bool:
    """Whether `spec` is a CRI pod's sandbox container (containerd's or CRI-O's annotation says so)."""
    notes = spec.get("annotations")
    if not isinstance(notes, dict):
        return False
    return SANDBOX_TYPE in (notes.get(CRI_CONTAINER_TYPE), notes.get(CRIO_CONTAINER_TYPE))


def runs_without_guest(config: Config, spec: dict[str, Any], stdio: Stdio) -> bool:
    """Whether the container is a pod's pause to answer for without a guest process: a CRI sandbox
    container, with no stdio (CRI gives it none; output a process could write must have a process),
    unless the admin keeps the pause in the guest (runtime.sandbox_pause_in_guest)."""
    quiet = not (stdio.stdin or stdio.stdout or stdio.stderr or stdio.terminal)
    return quiet and not config.runtime.sandbox_pause_in_guest and is_pod_sandbox(spec)


def exit_status(signum: int) -> int | None:
    """The exit status of a pause sent `signum`, or None when the pause would ignore it."""
    return EXIT_ON_SIGNAL.get(signum)


def empty_stats() -> agent_pb2.CgroupStats:
    """The statistics of a sandbox container with no process: nothing used."""
    return agent_pb2.CgroupStats(cgroup_version=2)


def shares_pod_pid_namespace(spec: dict[str, Any]) -> bool:
    """Whether a container joins the pod's pid namespace: CRI gives its pid namespace entry the path of
    the sandbox's (pid=POD; pid=CONTAINER has no path, pid=NODE no entry)."""
    linux = spec.get("linux")
    entries = linux.get("namespaces") if isinstance(linux, dict) else None
    return isinstance(entries, list) and any(
        isinstance(ns, dict) and ns.get("type") == "pid" and bool(ns.get("path")) for ns in entries)


async def pid_namespace_holder(st: TaskState, spec: dict[str, Any]) -> str:
    """The container whose pid namespace a new container joins: the pod's pause (started in the guest
    now if it has no process yet) when the container shares the pod's (CRI pid=POD), else "" (a pid
    namespace of its own)."""
    pause = st.containers.get(st.sandbox_id)
    if pause is None or pause.deleted or not is_pod_sandbox(pause.spec) or not shares_pod_pid_namespace(spec):
        return ""
    await materialize(st, pause)
    return pause.id


async def kill(st: TaskState, sc: ShimContainer, signum: int) -> bool:
    """Kill of the sandbox task's init while it has no guest process: record the exit the pause would
    have. False when the pause was made meanwhile (the caller signals it in the guest)."""
    async with sc.guest_lock:  # not while it is being made
        if not sc.guestless:
            return False
        status = exit_status(signum)
        log.info("kill %s with signal %d: no process in the guest, %s", sc.id, signum,
                 "ignored, as the pause would" if status is None else f"exit status {status}")
        if status is not None:
            await exits.record_exit(st, sc, sc.init, status)
        return True


async def materialize(st: TaskState, sc: ShimContainer) -> None:
    """Create and start the sandbox container's pause in the guest, once; from then on its task is an
    ordinary one (its exit, when it comes, is the guest's). Raises FailedPrecondition when the
    sandbox task is not running; AgentError (as an RPC error) when the guest refuses."""
    async with sc.guest_lock:
        if not sc.guestless:
            return
        if sc.init.state != "running" or sc.deleted:
            raise FailedPrecondition(f"the pod's sandbox container {sc.id} is {sc.init.state}")
        sandbox = st.running_sandbox()
        mark("pause.materialize")
        log.info("starting the pod's pause in the guest (it was not needed until now)")
        pio = await ProcessIO.open(sc.init.stdio, container_id=sc.id, namespace=st.namespace)
        try:
            with agent_errors(f"create {sc.id}"):
                container = await sandbox.create_container(sc.id, sc.spec, rootfs_mounts(sc.bundle, sc.spec,
                                                                                         sc.rootfs))
            try:
                with agent_errors(f"start {sc.id}"):
                    await container.start()
            except BaseException:
                await container.delete()
                raise
        except BaseException:
            await pio.close()
            raise
        sc.sandbox_container = container
        sc.init.proc, sc.init.io, sc.init.guest_pid = container.init, pio, container.init.pid
        pio.attach(container.init)
        sc.guestless = False
        sc.init.waiter = st.spawn(exits.wait_process(st, sc, sc.init), f"wait-{sc.id}")
        mark("pause.materialized")
        log.info("the pod's pause runs in the guest, pid %d", container.init.pid)
