"""State, Pids, Wait and Connect: answered from what the shim knows."""

from __future__ import annotations

import logging
import os

from pykata.protocols import runc_options_pb2, shim_pb2, typeurl
from pykata.shim.tasks.model import timestamp
from pykata.shim.tasks.state import TaskState

log = logging.getLogger("pykata.shim")


async def state(st: TaskState, req: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
    sc = st.container(req.id)
    p = sc.process(req.exec_id)
    s = p.stdio
    return shim_pb2.StateResponse(
        id=p.id, bundle=str(sc.bundle), pid=p.pid, status=sc.status(p), stdin=s.stdin, stdout=s.stdout,
        stderr=s.stderr, terminal=s.terminal, exit_status=p.exit_status, exited_at=timestamp(p.exited_at),
        exec_id=p.exec_id)


async def pids(st: TaskState, req: shim_pb2.PidsRequest) -> shim_pb2.PidsResponse:
    sc = st.container(req.id)
    out = shim_pb2.PidsResponse()
    for p in sc.processes():
        if p.state != "running":
            continue
        info = out.processes.add(pid=p.pid)
        if p.exec_id:
            info.info.CopyFrom(typeurl.pack(runc_options_pb2.ProcessDetails(exec_id=p.exec_id)))
    return out


async def wait(st: TaskState, req: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
    sc = st.container(req.id)
    p = sc.process(req.exec_id)
    await p.exited.wait()
    return shim_pb2.WaitResponse(exit_status=p.exit_status, exited_at=timestamp(p.exited_at))


async def connect(st: TaskState, req: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
    sc = st.containers.get(req.id)
    return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=sc.init.pid if sc is not None else 0)
