"""Pause, Resume, Kill, ResizePty, CloseIO, Update and Stats: one layer down, through the Sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from google.protobuf.empty_pb2 import Empty

from pykata.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PykataError,
)
from pykata.protocols import events_pb2, shim_pb2, typeurl
from pykata.shim.errors import agent_errors
from pykata.shim.stats import metrics_any
from pykata.shim.tasks import exits, pauseless, pod, resize
from pykata.shim.tasks.model import ShimContainer, ShimProcess
from pykata.shim.tasks.state import TaskState
from pykata.ttrpc import Code

log = logging.getLogger("pykata.shim")
# How long Stats waits for the guest. containerd answers a metrics request for many tasks (CRI's
# ListContainerStats: kubelet's summary of the whole node, which its eviction manager and metrics-server
# read, the latter within 10 s) once every shim answered, so one guest that never answers delayed every
# pod's figures by the agent's whole request timeout (30 s) at each request. An honest guest answers in
# tens of milliseconds, a few seconds on a saturated TCG host; a late one gets no figures this time.
STATS_TIMEOUT = 5.0
# An exec's exit status when the shim ends it after a SIGKILL the guest did not carry out (128 + SIGKILL).
KILLED_STATUS = 128 + signal.SIGKILL


async def pause(st: TaskState, req: shim_pb2.PauseRequest) -> Empty:
    sc = st.container(req.id)
    return await st.to_completion(_pause(st, sc), f"pause-{sc.id}")


async def _pause(st: TaskState, sc: ShimContainer) -> Empty:
    async with sc.lock:
        if sc.init.state != "running" or sc.deleted:
            raise FailedPrecondition(f"cannot pause a {sc.init.state} container")
        if sc.paused:
            raise FailedPrecondition("cannot pause a paused container")
        sandbox = st.running_sandbox()
        if not sc.guestless:  # a pause with no process: nothing to freeze
            with agent_errors(f"pause {sc.id}"):
                await sandbox.pause_container(sc.id)
        sc.paused = True
        st.publish(events_pb2.TaskPaused(container_id=sc.id))
    return Empty()


async def resume(st: TaskState, req: shim_pb2.ResumeRequest) -> Empty:
    sc = st.container(req.id)
    return await st.to_completion(_resume(st, sc), f"resume-{sc.id}")


async def _resume(st: TaskState, sc: ShimContainer) -> Empty:
    async with sc.lock:
        if not sc.paused or sc.deleted:
            raise FailedPrecondition(f"cannot resume a container that is not paused ({sc.init.state})")
        sandbox = st.running_sandbox()
        if not sc.guestless:
            with agent_errors(f"resume {sc.id}"):
                await sandbox.resume_container(sc.id)
        sc.paused = False
        st.publish(events_pb2.TaskResumed(container_id=sc.id))
    return Empty()


async def kill(st: TaskState, req: shim_pb2.KillRequest) -> Empty:
    sc = st.container(req.id)
    p = sc.process(req.exec_id)
    if p.exec_id and p.state == "created":
        raise FailedPrecondition(f"exec {p.exec_id}: process not created")
    if p.state == "stopped" or st.vm_dead:
        raise NotFound(f"{p.id}: process already finished")
    if not 0 < req.signal < 65:
        raise InvalidArgument("signal", f"{req.signal} is not a signal number")
    sandbox = st.running_sandbox()
    if p is sc.init and sc.guestless and await pauseless.kill(st, sc, req.signal):
        return Empty()
    log.info("kill %s with signal %d (all=%s)", p.id, req.signal, req.all)
    try:
        with agent_errors(f"kill {p.id}"):
            await sandbox.signal_process(sc.id, p.exec_id, req.signal, all_processes=req.all)
    except PykataError as e:
        if p.stopped or e.rpc_code in (Code.NOT_FOUND, Code.UNAVAILABLE):
            raise NotFound(f"{p.id}: process already finished") from None
        if req.signal == signal.SIGKILL and p is sc.init:
            # SIGKILL must not depend on the guest's good will: an agent that does not carry it
            # out (no answer, a refused answer) loses the VM, and so every process in it.
            await pod.kill_vm(st, f"the agent did not kill {p.id}: {e}")
            return Empty()
        if req.signal == signal.SIGKILL and not sc.paused:  # an exec: ended on the host's side, below
            st.spawn(_exit_or_end_exec(st, sc, p, sandbox.config.agent.pykata.request_timeout),
                     f"kill-deadline-{p.id}")
        raise
    if req.signal == signal.SIGKILL and p is sc.init and not p.stopped and not sc.paused:
        # nor on its word: an agent that acknowledges the kill and never reports the exit would keep
        # the container, and so the pod and its VM, from ever being removed (containerd waits for the
        # exit of a killed task without a deadline)
        # (twice the request timeout: a container restarted alone must not cost its pod the VM because a
        # loaded host made its exit slow)
        st.spawn(_exit_or_kill_vm(st, p, 2 * sandbox.config.agent.pykata.request_timeout), f"kill-deadline-{p.id}")
    elif req.signal == signal.SIGKILL and p is not sc.init and not p.stopped and not sc.paused:
        # an exec's likewise: containerd's ExecSync (a probe's timeout, `ctr task exec`) waits for the
        # exit and the end of the exec's output of a process it killed, without a deadline of its own
        st.spawn(_exit_or_end_exec(st, sc, p, sandbox.config.agent.pykata.request_timeout), f"kill-deadline-{p.id}")
    return Empty()


async def _exit_or_kill_vm(st: TaskState, p: ShimProcess, deadline: float) -> None:
    """Stop the VM when `p` has not exited `deadline` seconds (twice the agent's request timeout, the
    bound on every guest answer) after the agent acknowledged its SIGKILL."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(p.exited.wait(), deadline)
    if not p.stopped and not st.vm_dead:
        await pod.kill_vm(st, f"{p.id} did not exit within {deadline:g} s of a SIGKILL the agent acknowledged")


async def _exit_or_end_exec(st: TaskState, sc: ShimContainer, p: ShimProcess, grace: float) -> None:
    """End exec `p` on the host's side when it has not exited `grace` seconds (the agent's request
    timeout) after the agent acknowledged its SIGKILL: its exit is recorded as a SIGKILL's (137, what
    the kill would have given), TaskExit published, its wait and output copies stopped and containerd's
    ends of its stdio closed, so ExecSync and `ctr task exec` return. What the guest does with the
    process afterwards is the guest's own business: it runs inside the VM's bounds, as everything
    there. The container and the VM are left alone (an exec is not worth the pod)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(p.exited.wait(), grace)
    if p.stopped or st.vm_dead:
        return
    log.warning("exec %s in %s did not exit within %g s of a SIGKILL the agent acknowledged: ended as "
                "killed (status %d), its IO closed", p.exec_id, sc.id, grace, KILLED_STATUS)
    await exits.record_exit(st, sc, p, KILLED_STATUS)
    if p.waiter is not None:  # its WaitProcess would wait for the guest as long as the pod lives
        p.waiter.cancel()
    if p.io is not None:
        await p.io.close()


async def resize_pty(st: TaskState, req: shim_pb2.ResizePtyRequest) -> Empty:
    sc = st.container(req.id)
    p = sc.process(req.exec_id)
    if not p.stdio.terminal:
        return Empty()
    if p.proc is None:  # an exec not started yet gets its size at start
        p.console_size = (req.height, req.width)
        return Empty()
    if p.state == "stopped":
        raise FailedPrecondition(f"cannot resize a stopped process {p.id}")
    try:
        with agent_errors(f"resize {p.id}"):
            await p.proc.resize(req.height, req.width)
    except PykataError:
        if not p.stopped:  # it ended while we resized: nothing to resize any more
            raise
    return Empty()


async def close_io(st: TaskState, req: shim_pb2.CloseIORequest) -> Empty:
    sc = st.container(req.id)
    p = sc.process(req.exec_id)
    if req.stdin and p.io is not None:
        await p.io.close_stdin()
    return Empty()


async def update(st: TaskState, req: shim_pb2.UpdateTaskRequest) -> Empty:
    sc = st.container(req.id)
    try:
        resources = typeurl.unpack_json(req.resources, typeurl.OCI_LINUX_RESOURCES_URL)
    except typeurl.TypeURLError as e:
        raise InvalidArgument("resources", str(e)) from None
    if not isinstance(resources, dict):
        raise InvalidArgument("resources", "must be an OCI LinuxResources object")
    sandbox = st.running_sandbox()
    with agent_errors(f"update {sc.id}"):
        # the VM grows before the container may use more, and shrinks after the container's cgroup
        # gave the memory back (a balloon cannot take what the guest still uses)
        grows = resize.grows(st, sc.id, resources)
        if grows:
            await resize.container_updated(st, sc.id, resources)
        if not sc.guestless:  # a pause with no process has no cgroup in the guest to update
            await sandbox.update_container(sc.id, resources)
        if not grows:
            await resize.container_updated(st, sc.id, resources)
    return Empty()


async def stats(st: TaskState, req: shim_pb2.StatsRequest) -> shim_pb2.StatsResponse:
    sc = st.container(req.id)
    sandbox = st.running_sandbox()
    if sc.guestless:
        return shim_pb2.StatsResponse(stats=metrics_any(pauseless.empty_stats()))
    with agent_errors(f"stats {sc.id}"):
        limit = min(STATS_TIMEOUT, sandbox.config.agent.pykata.request_timeout)
        stats = await sandbox.stats_container(sc.id, timeout=limit)
    return shim_pb2.StatsResponse(stats=metrics_any(stats))
