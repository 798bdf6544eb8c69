"""Start: a container's init or an exec, in a task of its own so a hung-up containerd cannot cut it in half."""

from __future__ import annotations

import logging

from pykata.errors import (
    FailedPrecondition,
    NotFound,
)
from pykata.protocols import events_pb2, shim_pb2
from pykata.shim.errors import agent_errors
from pykata.shim.tasks import exits, pauseless
from pykata.shim.tasks.model import ShimContainer, ShimProcess, exec_process
from pykata.shim.tasks.state import TaskState
from pykata.timing import mark

log = logging.getLogger("pykata.shim")
# The exit status of an exec whose start failed (as a shell reports a command it could not run).
EXEC_FAILED_STATUS = 126


async def start(st: TaskState, req: shim_pb2.StartRequest) -> shim_pb2.StartResponse:
    sc = st.container(req.id)
    p = sc.process(req.exec_id)
    phase = "rpc.exec" if req.exec_id else "rpc.start"
    mark(phase)
    # to completion even if containerd hangs up: a process started in the guest is known as such
    resp = await st.to_completion(_start(st, sc, p), f"start-{p.id}")
    mark(f"{phase}.done")
    return resp


async def _start(st: TaskState, sc: ShimContainer, p: ShimProcess) -> shim_pb2.StartResponse:
    async with p.lock:
        if p.deleted or sc.deleted:
            raise NotFound(f"process {p.id} was deleted")
        if p.state != "created":
            raise FailedPrecondition(f"cannot start a {p.state} process")
        if p is sc.init:
            st.running_sandbox()
            if not sc.guestless:  # a pod's pause without a process has nothing to start
                assert sc.sandbox_container is not None
                with agent_errors(f"start {sc.id}"):
                    await sc.sandbox_container.start()
            p.state = "running"
            st.publish(events_pb2.TaskStart(container_id=sc.id, pid=p.pid))
            if st.on_first_start is not None:
                done, st.on_first_start = st.on_first_start, None
                done()
        else:
            try:
                await _start_exec(st, sc, p)
            except BaseException:
                # Never started (e.g. the agent policy refused it): nothing will exit, so end it
                # here; a Wait returns and containerd's readers of its stdio see EOF.
                if p.state == "created":
                    p.set_exited(EXEC_FAILED_STATUS)
                    if p.io is not None:
                        await p.io.close()
                raise
            st.publish(events_pb2.TaskExecStarted(container_id=sc.id, exec_id=p.exec_id, pid=p.pid))
    log.info("started %s, pid %d in the guest", p.id, p.guest_pid)
    return shim_pb2.StartResponse(pid=p.pid)


async def _start_exec(st: TaskState, sc: ShimContainer, p: ShimProcess) -> None:
    if sc.init.state != "running":
        raise FailedPrecondition(f"cannot exec in a {sc.init.state} container")
    if sc.paused:
        raise FailedPrecondition("cannot exec in a paused container")
    st.running_sandbox()
    proc = exec_process(p.spec, terminal=p.stdio.terminal, console_size=p.console_size)  # checked first
    if sc.guestless:  # an exec into the pod's sandbox container needs its pause
        await pauseless.materialize(st, sc)
    assert sc.sandbox_container is not None
    with agent_errors(f"exec {p.exec_id} in {sc.id}"):
        p.proc = await sc.sandbox_container.exec_process(p.exec_id, proc)
    mark("exec.started")
    p.pid, p.guest_pid, p.state = st.host_pid(), p.proc.pid, "running"
    if p.io is not None:
        p.io.attach(p.proc)
    p.waiter = st.spawn(exits.wait_process(st, sc, p), f"wait-{sc.id}-{p.exec_id}")
