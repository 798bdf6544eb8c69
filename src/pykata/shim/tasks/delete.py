"""Delete: a container (in a task of its own; the sandbox's own or last container stops the VM) or an exec."""

from __future__ import annotations

import asyncio
import logging

from pykata.errors import (
    FailedPrecondition,
    NotFound,
)
from pykata.protocols import events_pb2, shim_pb2
from pykata.sandbox import Container
from pykata.shim.logs import current_container
from pykata.shim.tasks import pod, resize
from pykata.shim.tasks.model import VM_GONE_STATUS, ShimContainer, ShimProcess, timestamp
from pykata.shim.tasks.state import TaskState
from pykata.timing import mark

log = logging.getLogger("pykata.shim")
IO_DRAIN_TIMEOUT = 2.0  # how long Delete lets output finish (runc's shim waits 2 s too)


async def delete(st: TaskState, req: shim_pb2.DeleteRequest) -> shim_pb2.DeleteResponse:
    current_container.set(req.id)
    mark("rpc.delete")
    sc = st.containers.get(req.id)  # also while its deletion runs: a second Delete waits for it
    if sc is None:
        raise NotFound(f"container {req.id}: container not created")
    if req.exec_id:
        return await _delete_exec(st, sc, sc.process(req.exec_id))
    mine = False
    if sc.deleting is None:
        async with sc.init.lock:  # not in the middle of a Start
            if sc.deleting is None:
                if sc.init.state == "running":
                    raise FailedPrecondition(f"container {sc.id}: cannot delete a running process")
                sc.deleted = True
                # a task of its own: containerd closing the connection cancels this RPC, and a
                # deletion cut in half would leave the container, and with it the VM, behind
                sc.deleting = st.spawn(_delete_container(st, sc), f"delete-{sc.id}")
                mine = True
    resp: shim_pb2.DeleteResponse = await asyncio.shield(sc.deleting)
    if not mine:  # containerd takes NOT_FOUND as "already deleted"
        raise NotFound(f"container {sc.id}: cannot delete a deleted process")
    return resp


async def _delete_container(st: TaskState, sc: ShimContainer) -> shim_pb2.DeleteResponse:
    init = sc.init
    log.info("delete (status %s, exit %d)", init.state, init.exit_status)
    if init.io is not None:
        await init.io.wait_output(IO_DRAIN_TIMEOUT)
    for p in sc.processes():
        if p.io is not None:
            await p.io.close()
    mark("delete.io.closed")
    # the VM goes down after the sandbox's own (or the last) container: removing it in the guest
    # first would only cost time (its processes have all ended: Delete needs the init stopped)
    stop_vm = sc.id == st.sandbox_id or all(c is sc for c in st.containers.values())
    container = sc.sandbox_container
    if container is not None and not stop_vm and not st.vm_dead and not resize.leaving_resizes(st, sc.id):
        # The guest's part (crun delete, the container's bundle, mounts and cgroup: 0.15-0.25 s
        # under TCG) comes after the answer (TaskState.remove_later): the process has ended,
        # nothing of it is visible outside the guest, and nothing containerd does next needs it;
        # in a pod's teardown the VM's stop comes first and it is never done. A Create of the same
        # id waits for it. A container whose leaving shrinks the VM is removed before the answer,
        # as the shrink needs its memory back.
        await resize.container_left(st, sc.id)  # only uncounts it: the pod's size stays
        st.remove_later(sc.id, lambda: _remove_in_guest(container))
    else:
        if container is not None:  # idempotent; with the VM gone it only undoes host mounts
            await container.delete(in_guest=not stop_vm and not st.vm_dead)
        if not stop_vm:
            await resize.container_left(st, sc.id)  # the VM shrinks by what it asked for (never raises)
    mark("delete.removed")
    for p in sc.processes():
        # a process never started (or the rest of a dead VM) ends here; Wait callers return
        p.set_exited(VM_GONE_STATUS if p.state != "stopped" else p.exit_status)
        if p.waiter is not None:
            p.waiter.cancel()
    st.containers.pop(sc.id, None)
    st.publish(events_pb2.TaskDelete(container_id=sc.id, id=sc.id, pid=init.pid,
                                     exit_status=init.exit_status, exited_at=timestamp(init.exited_at)))
    if stop_vm:
        # containerd gets its answer while the VM goes down: it overlaps with containerd's own
        # cleanup; the shim exits only once the VM is gone (close() waits for the same stop)
        st.sandbox_stopping = True
        st.spawn(pod.stop_sandbox(st), "stop-sandbox")
    if st.exit_when_empty and not st.containers and not st.creating:
        st.begin_exit()
    mark("rpc.delete.done")
    return shim_pb2.DeleteResponse(pid=init.pid, exit_status=init.exit_status, exited_at=timestamp(init.exited_at))


async def _remove_in_guest(container: Container) -> None:
    """A deleted container's guest part and host mounts (Container.delete: never raises)."""
    await container.delete(in_guest=True)
    mark("delete.guest.removed")


async def _delete_exec(st: TaskState, sc: ShimContainer, p: ShimProcess) -> shim_pb2.DeleteResponse:
    async with p.lock:
        if p.deleted:
            raise NotFound(f"exec {p.exec_id}: cannot delete a deleted process")
        if p.state == "running":
            raise FailedPrecondition(f"exec {p.exec_id}: cannot delete a running process")
        p.deleted = True
    sc.execs.pop(p.exec_id, None)
    if p.io is not None:
        await p.io.wait_output(IO_DRAIN_TIMEOUT)
        await p.io.close()
    return shim_pb2.DeleteResponse(pid=p.pid, exit_status=p.exit_status, exited_at=timestamp(p.exited_at))
