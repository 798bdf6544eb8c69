"""containerd's Task service (containerd.task.v2.Task) over one pykata sandbox.

The first Create boots the sandbox (the VM); every container of the shim lives in it. Deleting the
sandbox's own container (or the last container) stops the VM (the answer does not wait for that),
and Shutdown with no containers left ends the shim once the VM is gone. Requests may repeat and
race (containerd and CRI retry; kubelet deletes twice; containerd closes its connection to the
shim as soon as one Delete of a task has been answered, cancelling whatever else was in flight):

- Kill of a stopped process and Delete of a deleted task answer NOT_FOUND, which containerd takes as
  "already done"; Delete of a running process answers FAILED_PRECONDITION.
- A Delete (and Start, Pause, Resume) runs in a task of its own that a cancelled RPC does not stop:
  a state change is never left half done. A second Delete waits for the first, then NOT_FOUND.
- A Shutdown that comes while the last containers are being deleted ends the shim after them.
- A process's lock orders its start and its exit, so TaskExit never overtakes TaskStart. No lock is
  held across an unbounded wait (agent calls carry timeouts; Wait only waits on an event).
- When the VM dies, every process not yet stopped is stopped with status 137, TaskExit is published
  for it and every Wait returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.empty_pb2 import Empty

from pykata.config import Config
from pykata.errors import Unimplemented
from pykata.protocols import shim_pb2
from pykata.sandbox import Sandbox
from pykata.shim.events import EventPublisher
from pykata.shim.tasks import control, create, delete, execs, pod, query, shutdown, start
from pykata.shim.tasks.state import TaskState


class TaskService(TaskState):
    """The handler object for TASK_SERVICE: one method per RPC, each handing the request one layer down
    (pykata.shim.tasks, which reach the VM and the agent only through pykata.sandbox)."""

    def __init__(self, sandbox_id: str, namespace: str, events: EventPublisher, *,
                 config: Callable[[dict[str, str]], Config] | None = None,
                 on_exit: Callable[[], None] | None = None, warm: Sandbox | None = None,
                 warm_netns: str | None = None) -> None:
        super().__init__(sandbox_id, namespace, events, load_config=config or pod.pod_config, on_exit=on_exit)
        self.warm = warm
        self.warm_netns = warm_netns

    async def Create(self, req: shim_pb2.CreateTaskRequest, ctx: Any) -> shim_pb2.CreateTaskResponse:
        return await create.create(self, req)

    async def Start(self, req: shim_pb2.StartRequest, ctx: Any) -> shim_pb2.StartResponse:
        return await start.start(self, req)

    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: Any) -> Empty:
        return await execs.add_exec(self, req)

    async def Delete(self, req: shim_pb2.DeleteRequest, ctx: Any) -> shim_pb2.DeleteResponse:
        return await delete.delete(self, req)

    async def State(self, req: shim_pb2.StateRequest, ctx: Any) -> shim_pb2.StateResponse:
        return await query.state(self, req)

    async def Pids(self, req: shim_pb2.PidsRequest, ctx: Any) -> shim_pb2.PidsResponse:
        return await query.pids(self, req)

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: Any) -> shim_pb2.WaitResponse:
        return await query.wait(self, req)

    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: Any) -> shim_pb2.ConnectResponse:
        return await query.connect(self, req)

    async def Pause(self, req: shim_pb2.PauseRequest, ctx: Any) -> Empty:
        return await control.pause(self, req)

    async def Resume(self, req: shim_pb2.ResumeRequest, ctx: Any) -> Empty:
        return await control.resume(self, req)

    async def Kill(self, req: shim_pb2.KillRequest, ctx: Any) -> Empty:
        return await control.kill(self, req)

    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx: Any) -> Empty:
        return await control.resize_pty(self, req)

    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx: Any) -> Empty:
        return await control.close_io(self, req)

    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx: Any) -> Empty:
        return await control.update(self, req)

    async def Stats(self, req: shim_pb2.StatsRequest, ctx: Any) -> shim_pb2.StatsResponse:
        return await control.stats(self, req)

    async def Checkpoint(self, req: shim_pb2.CheckpointTaskRequest, ctx: Any) -> Empty:
        raise Unimplemented("checkpoint is not supported by pykata")

    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: Any) -> Empty:
        return await shutdown.shutdown(self, req)

    async def stop_sandbox(self) -> None:
        """Stop the VM (idempotent; see pykata.shim.tasks.pod.stop_sandbox)."""
        await pod.stop_sandbox(self)

    async def close(self) -> None:
        """Stop the sandbox and every copy of stdio; called once the shim is to exit."""
        await shutdown.close(self)
