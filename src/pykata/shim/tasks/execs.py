"""Exec: register an exec process (checked now, started by Start)."""

from __future__ import annotations

import logging

from google.protobuf.empty_pb2 import Empty

from pykata import ids
from pykata.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
)
from pykata.protocols import events_pb2, shim_pb2, typeurl
from pykata.shim.stdio import ProcessIO, Stdio
from pykata.shim.tasks.model import ShimProcess, exec_process
from pykata.shim.tasks.state import TaskState

log = logging.getLogger("pykata.shim")


async def add_exec(st: TaskState, req: shim_pb2.ExecProcessRequest) -> Empty:
    exec_id = ids.check_exec_id(req.exec_id, "exec_id")
    sc = st.container(req.id)
    if exec_id in sc.execs:
        raise AlreadyExists(f"exec {exec_id} in container {sc.id}: already exists")
    if sc.init.state == "stopped":
        raise FailedPrecondition(f"container {sc.id} is stopped")
    try:
        spec = typeurl.unpack_json(req.spec, typeurl.OCI_PROCESS_URL)
    except typeurl.TypeURLError as e:
        raise InvalidArgument("spec", str(e)) from None
    exec_process(spec, terminal=req.terminal, console_size=None)  # reject a bad spec now, not at Start
    stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
    p = ShimProcess(sc.id, exec_id, stdio, spec)
    sc.execs[exec_id] = p  # reserved before the first await: a duplicate racing us sees it
    try:
        p.io = await ProcessIO.open(stdio, container_id=sc.id, namespace=st.namespace)
    except BaseException:
        sc.execs.pop(exec_id, None)
        raise
    st.publish(events_pb2.TaskExecAdded(container_id=sc.id, exec_id=exec_id))
    return Empty()
