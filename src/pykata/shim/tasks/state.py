"""What the shim's Task service holds, and the few things every RPC does with it.

`TaskState` is the service's state (containers, the sandbox, what is being created or deleted, the
background tasks) with its helpers; the RPCs live in the modules beside this one, as functions of a
TaskState (Kata's shim: `create.go`, `start.go`, `delete.go` over one `service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from google.protobuf.message import Message

from pykata.config import Config
from pykata.errors import FailedPrecondition, NotFound, PykataError
from pykata.resources import cgroups, sizing
from pykata.sandbox import Sandbox
from pykata.shim.events import EventPublisher
from pykata.shim.logs import current_container
from pykata.shim.tasks.model import ShimContainer

log = logging.getLogger("pykata.shim")
_T = TypeVar("_T")
# A deleted container of a running pod leaves the guest this long after its Delete was answered:
# in a pod's teardown (kubelet stops every container, then the sandbox, within a second or so) the
# VM's stop comes first and the guest is spared the work while it is asked to end the others.
REMOVE_DELAY = 1.0


class TaskState:
    """The state of one shim's Task service (one sandbox, its containers and their processes)."""

    def __init__(self, sandbox_id: str, namespace: str, events: EventPublisher, *,
                 load_config: Callable[[dict[str, str]], Config],
                 on_exit: Callable[[], None] | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.namespace = namespace
        self.events = events
        # containerd's address (`-address`): which fork server forks this pod's refills of the pool
        self.containerd_address = ""
        self.load_config = load_config
        self.on_exit = on_exit
        self.containers: dict[str, ShimContainer] = {}
        self.creating: set[str] = set()
        # deleted containers whose guest part is still to be removed (pykata.shim.tasks.delete), with
        # the event that ends the wait before it
        self.removing: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self.sandbox: Sandbox | None = None
        # A VM from the warm pool this shim was claimed with (pykata.factory.pool), until the first
        # Create takes it (or finds that the pod does not fit it and stops it)
        self.warm: Sandbox | None = None
        # the pod's network namespace as the claim handed it over (an fd's path: the waiting shim's mount
        # namespace may not have the pod's mount), for a warm VM with a NIC
        self.warm_netns: str | None = None
        # called once, when the pod's first container has started (a pooled shim: its claim's start is
        # over, pykata.factory.pool.begin_start)
        self.on_first_start: Callable[[], None] | None = None
        self.cgroup: tuple[cgroups.SandboxCgroup, Config] | None = None
        self.sandbox_lock = asyncio.Lock()
        # what the pod's containers ask for (the VM follows it: pykata.shim.tasks.resize)
        self.resources = sizing.PodResources()
        self.resize_lock = asyncio.Lock()
        self.sandbox_stopping = False
        self.vm_dead = False
        self.shutting_down = False
        self.exit_when_empty = False
        self.exit_requested = asyncio.Event()
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if task.cancelled():
            return
        e = task.exception()  # retrieved here too: its RPC may have been cancelled and never see it
        if e is not None and not isinstance(e, PykataError):
            log.error("%s failed: %r", task.get_name(), e, exc_info=e)

    def remove_later(self, container_id: str, remove: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a deleted container's removal from the guest in the background, REMOVE_DELAY from
        now (at once for wait_removed; never when cancel_removals comes first)."""
        hurry = asyncio.Event()

        async def later() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), REMOVE_DELAY)
            await remove()

        task = self.spawn(later(), f"remove-{container_id}")
        self.removing[container_id] = (task, hurry)

        def forget(t: asyncio.Task[Any]) -> None:
            if self.removing.get(container_id, (None,))[0] is t:
                del self.removing[container_id]
        task.add_done_callback(forget)

    async def wait_removed(self, container_id: str) -> None:
        """Until a deleted container of this id is gone from the guest (a Create reusing the id)."""
        pending = self.removing.get(container_id)
        if pending is not None:
            task, hurry = pending
            hurry.set()
            await asyncio.wait([task])  # its outcome is its own (logged); not cancelled with the caller

    async def cancel_removals(self) -> None:
        """The VM is about to stop: the guest parts of deleted containers not removed yet go with
        it (their host mounts go with the sandbox's teardown)."""
        pending = [task for task, _ in self.removing.values()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def to_completion(self, coro: Coroutine[Any, Any, _T], name: str) -> _T:
        """Await `coro` in a task of its own that runs to its end even if this RPC is cancelled."""
        return await asyncio.shield(self.spawn(coro, name))

    def container(self, container_id: str) -> ShimContainer:
        current_container.set(container_id)
        sc = self.containers.get(container_id)
        if sc is None or sc.deleted:
            raise NotFound(f"container {container_id}: container not created")
        return sc

    def publish(self, event: Message) -> None:
        self.events.publish(event)

    def host_pid(self) -> int:
        """The pid containerd is told for every process of the pod: the VMM's, as Kata does (pids in
        the guest are the guest's choice, and mean nothing, or some other process, on the host)."""
        vm = self.sandbox.vm if self.sandbox is not None else None
        return (vm.pid if vm is not None else None) or 0

    def running_sandbox(self) -> Sandbox:
        if self.sandbox is None or self.vm_dead or self.sandbox_stopping:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} is not running")
        return self.sandbox

    def begin_exit(self) -> None:
        if self.shutting_down:
            return
        log.info("shutdown: no containers left, the shim exits")
        self.shutting_down = True
        if self.on_exit is not None:
            self.on_exit()
        # after the reply to the RPC that ended the shim is written (the daemon also waits for it)
        asyncio.get_running_loop().call_soon(self.exit_requested.set)
