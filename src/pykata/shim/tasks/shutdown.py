"""Shutdown and the end of the shim."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from google.protobuf.empty_pb2 import Empty

from pykata.errors import (
    PykataError,
)
from pykata.protocols import shim_pb2
from pykata.shim.logs import current_container
from pykata.shim.tasks import pod
from pykata.shim.tasks.state import TaskState
from pykata.timing import mark

log = logging.getLogger("pykata.shim")


async def shutdown(st: TaskState, req: shim_pb2.ShutdownRequest) -> Empty:
    current_container.set(req.id)
    mark("rpc.shutdown")
    if req.now:
        st.begin_exit()
        return Empty()
    if any(sc.deleting is None for sc in st.containers.values()):
        return Empty()  # the shim still serves containers
    if st.containers or st.creating:
        # Only containers being deleted (a Delete racing this Shutdown) or created are left: end after
        # them. containerd says Shutdown to a shim with a Create in flight when it gave up on that
        # Create (a CRI deadline: it hangs up, which cancels the Create, and runs `delete`, which says
        # Shutdown once); the Create's teardown of a half-booted VM outlasts that, and the shim stayed
        # forever with nothing to serve. A Create that succeeds keeps the shim (create clears this).
        st.exit_when_empty = True
        return Empty()
    st.begin_exit()
    return Empty()


async def close(st: TaskState) -> None:
    """Stop the sandbox and every copy of stdio; called once the shim is to exit."""
    st.shutting_down = True
    for sc in list(st.containers.values()):
        for p in sc.processes():
            if p.io is not None:
                with contextlib.suppress(PykataError, OSError):
                    await p.io.close()
    await pod.stop_sandbox(st)
    if st.warm is not None:  # claimed from the pool, but no Create ever took it
        warm, st.warm = st.warm, None
        await warm.stop(remove=True)
    # The background tasks end before the pod's cgroup is removed: a pool refill (cancelled, it refills on
    # the way out) starts processes in the shim's cgroup and moves them out of the pod's only while the
    # shim still knows that cgroup; one left inside kept the directory from being removed.
    for t in list(st.background):
        t.cancel()
    if st.background:
        await asyncio.wait(list(st.background), timeout=2.0)
    pod.leave_cgroup(st)
