"""Process exits: each is recorded once (whoever sees it first) and published as TaskExit."""

from __future__ import annotations

import logging

from pykata.agentapi import AgentCallError
from pykata.errors import (
    PykataError,
)
from pykata.protocols import events_pb2
from pykata.shim.tasks.model import VM_GONE_STATUS, ShimContainer, ShimProcess
from pykata.shim.tasks.state import TaskState
from pykata.timing import mark
from pykata.ttrpc import Code

log = logging.getLogger("pykata.shim")


async def record_exit(st: TaskState, sc: ShimContainer, p: ShimProcess, status: int) -> None:
    async with p.lock:
        if not p.set_exited(status):
            return
        log.info("process %s exited with status %d", p.id, status)
        mark("exit.seen")
        if not sc.deleted and not p.deleted:
            st.publish(events_pb2.TaskExit(container_id=sc.id, id=p.id, pid=p.pid, exit_status=status,
                                           exited_at=p.exited_at))


async def wait_process(st: TaskState, sc: ShimContainer, p: ShimProcess) -> None:
    assert p.proc is not None
    try:
        if p.io is not None:
            await p.io.waiting_allowed()
        status = await p.proc.wait()
        mark("exit.waited")
    except AgentCallError as e:
        status = VM_GONE_STATUS if e.code == Code.UNAVAILABLE else 255
        log.warning("waiting for %s: %s (status %d)", p.id, e, status)
    except PykataError as e:
        status = 255
        log.warning("waiting for %s: %s", p.id, e)
    await record_exit(st, sc, p, status)
