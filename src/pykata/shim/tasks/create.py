"""Create: the first container boots the sandbox; each container is created (not started) in it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from pykata import ids
from pykata.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PykataError,
    Unimplemented,
)
from pykata.protocols import events_pb2, shim_pb2
from pykata.shim.errors import agent_errors
from pykata.shim.logs import current_container
from pykata.shim.stdio import ProcessIO, Stdio
from pykata.shim.tasks import exits, pauseless, pod, resize
from pykata.shim.tasks.model import ShimContainer, load_spec, rootfs_mounts
from pykata.shim.tasks.state import TaskState
from pykata.timing import mark

log = logging.getLogger("pykata.shim")


async def create(st: TaskState, req: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
    cid = ids.check_id("id", req.id)
    current_container.set(cid)
    if st.shutting_down:
        raise FailedPrecondition("the shim is shutting down")
    if cid in st.containers or cid in st.creating:
        raise AlreadyExists(f"container {cid}: already exists")
    if req.checkpoint or req.parent_checkpoint:
        raise Unimplemented("restoring from a checkpoint is not supported")
    st.creating.add(cid)
    mark("rpc.create")
    try:
        resp = await _create(st, req, cid)
    except BaseException:
        st.creating.discard(cid)
        if st.exit_when_empty and not st.containers and not st.creating:
            st.begin_exit()  # a Shutdown came meanwhile (shutdown.shutdown): nothing is left to serve
        raise
    finally:
        st.creating.discard(cid)
        mark("rpc.create.done")
    st.exit_when_empty = False  # a Shutdown that came meanwhile was for a shim with no task
    return resp


async def _create(st: TaskState, req: shim_pb2.CreateTaskRequest, cid: str) -> shim_pb2.CreateTaskResponse:
    bundle = Path(req.bundle)
    if not bundle.is_absolute():
        raise InvalidArgument("bundle", f"{req.bundle!r} is not an absolute path")
    spec = load_spec(bundle)
    await st.wait_removed(cid)  # the same id deleted a moment ago: its guest part is still going
    stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
    log.info("create: bundle %s, %d rootfs mounts, terminal=%s", bundle, len(req.rootfs), req.terminal)
    sc = ShimContainer(cid, bundle, spec, stdio, list(req.rootfs))
    try:
        sandbox = await pod.ensure_sandbox(st, spec)
        with agent_errors(f"resize for {cid}"):
            await resize.container_joined(st, cid, spec)
        if pauseless.runs_without_guest(sandbox.config, spec, stdio):
            sc.guestless = True  # the pod's pause: no process in the guest until one is needed
        else:
            await _create_in_guest(st, sc, req.terminal, await pauseless.pid_namespace_holder(st, spec))
    except BaseException:
        await asyncio.shield(resize.container_left(st, cid))
        await asyncio.shield(_stop_if_unused_after(st, cid))
        raise
    sc.init.pid = st.host_pid()
    st.containers[cid] = sc
    if sc.init.proc is not None and sc.init.io is not None:
        sc.init.io.attach(sc.init.proc)
        sc.init.waiter = st.spawn(exits.wait_process(st, sc, sc.init), f"wait-{cid}")
    for name, value in (("init.pid", sc.init.pid), ("shim.pid", os.getpid())):
        with contextlib.suppress(OSError):
            (bundle / name).write_text(str(value))
    st.publish(events_pb2.TaskCreate(
        container_id=cid, bundle=req.bundle, rootfs=req.rootfs, pid=sc.init.pid, checkpoint=req.checkpoint,
        io=events_pb2.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)))
    if sc.guestless:
        log.info("created the pod's sandbox container, with no process in the guest")
    else:
        log.info("created, pid %d in the guest", sc.init.guest_pid)
    return shim_pb2.CreateTaskResponse(pid=sc.init.pid)


async def _create_in_guest(st: TaskState, sc: ShimContainer, terminal: bool, pid_ns_container: str) -> None:
    """Create the container in the guest (its init waits for Start), with its stdio opened; in the pid
    namespace of container `pid_ns_container` when not empty."""
    assert st.sandbox is not None
    pio = await ProcessIO.open(sc.init.stdio, container_id=sc.id, namespace=st.namespace)
    try:
        with agent_errors(f"create {sc.id}"):
            container = await st.sandbox.create_container(sc.id, sc.spec, rootfs_mounts(sc.bundle, sc.spec, sc.rootfs),
                                                          terminal=terminal, pid_ns_container=pid_ns_container)
    except BaseException:
        await pio.close()
        raise
    sc.sandbox_container = container
    sc.init.proc, sc.init.io, sc.init.guest_pid = container.init, pio, container.init.pid


async def _stop_if_unused_after(st: TaskState, cid: str) -> None:
    st.creating.discard(cid)
    with contextlib.suppress(PykataError):
        await pod.stop_if_unused(st)
