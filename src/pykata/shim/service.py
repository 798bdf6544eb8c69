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

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from pykata import ids
from pykata.agentapi import AgentCallError
from pykata.config import Config, load_for_annotations
from pykata.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PykataError,
    Unimplemented,
)
from pykata.network import spec_netns
from pykata.protocols import events_pb2, runc_options_pb2, shim_pb2, typeurl
from pykata.resources import cgroups, sizing
from pykata.resources.mounts import RootfsMount
from pykata.sandbox import Sandbox, sandboxes_dir
from pykata.shim.errors import agent_errors
from pykata.shim.events import EventPublisher
from pykata.shim.logs import current_container
from pykata.shim.stats import metrics_any
from pykata.shim.stdio import ProcessIO, Stdio
from pykata.shim.task import VM_GONE_STATUS, ShimContainer, ShimProcess, exec_process, load_spec
from pykata.timing import mark
from pykata.ttrpc import Code

log = logging.getLogger("pykata.shim")
_T = TypeVar("_T")

# The exit status of an exec whose start failed (as a shell reports a command it could not run).
EXEC_FAILED_STATUS = 126
IO_DRAIN_TIMEOUT = 2.0  # how long Delete lets output finish (runc's shim waits 2 s too)
LEFTOVER_WAIT = 10.0  # a previous shim of the same id gets this long to finish exiting
# Seconds between two GetOOMEvent calls, at least: the guest chooses when each returns.
OOM_POLL_INTERVAL = 0.1


def _ts(ts: Timestamp | None) -> Timestamp:
    return ts if ts is not None else Timestamp()


class TaskService:
    """The handler object for TASK_SERVICE (one async method per RPC)."""

    def __init__(self, sandbox_id: str, namespace: str, events: EventPublisher, *,
                 config: Callable[[dict[str, str]], Config] | None = None,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.namespace = namespace
        self.events = events
        self._load_config = config or _pod_config
        self._on_exit = on_exit
        self.containers: dict[str, ShimContainer] = {}
        self._creating: set[str] = set()
        self.sandbox: Sandbox | None = None
        self._cgroup: tuple[cgroups.SandboxCgroup, Config] | None = None
        self._sandbox_lock = asyncio.Lock()
        self._sandbox_stopping = False
        self.vm_dead = False
        self.shutting_down = False
        self._exit_when_empty = False
        self.exit_requested = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    # -- helpers -----------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        e = task.exception()  # retrieved here too: its RPC may have been cancelled and never see it
        if e is not None and not isinstance(e, PykataError):
            log.error("%s failed: %r", task.get_name(), e, exc_info=e)

    async def _to_completion(self, coro: Coroutine[Any, Any, _T], name: str) -> _T:
        """Await `coro` in a task of its own that runs to its end even if this RPC is cancelled."""
        return await asyncio.shield(self._spawn(coro, name))

    def _container(self, container_id: str) -> ShimContainer:
        current_container.set(container_id)
        sc = self.containers.get(container_id)
        if sc is None or sc.deleted:
            raise NotFound(f"container {container_id}: container not created")
        return sc

    def _publish(self, event: Message) -> None:
        self.events.publish(event)

    def _host_pid(self) -> int:
        """The pid containerd is told for every process of the pod: the VMM's, as Kata does (pids in
        the guest are the guest's choice, and mean nothing, or some other process, on the host)."""
        vm = self.sandbox.vm if self.sandbox is not None else None
        return (vm.pid if vm is not None else None) or 0

    def _agent_sandbox(self) -> Sandbox:
        if self.sandbox is None or self.vm_dead or self._sandbox_stopping:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} is not running")
        return self.sandbox

    # -- sandbox -----------------------------------------------------------------------------------

    async def _ensure_sandbox(self, spec: dict[str, Any]) -> Sandbox:
        async with self._sandbox_lock:
            if self.sandbox is not None:
                return self._agent_sandbox()
            annotations = spec.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise InvalidArgument("config.json annotations", "must be an object")
            with agent_errors(f"sandbox {self.sandbox_id}"):
                config = self._load_config({str(k): str(v) for k, v in annotations.items()})
                await _remove_dead_leftover(config, self.sandbox_id)
                config, vcpus, memory_mib = _vm_size(spec, config)
                self._join_cgroup(config, spec)
                log.info("booting the sandbox VM (vcpus=%s memory=%s MiB)", vcpus or "default",
                         memory_mib or "default")
                try:
                    self.sandbox = await Sandbox.create(
                        self.sandbox_id, config=config, vcpus=vcpus, memory_mib=memory_mib,
                        hostname=str(spec.get("hostname") or ""), serve_proxy=True, netns=spec_netns(spec))
                except BaseException:
                    self._leave_cgroup()
                    raise
            self._sandbox_stopping = False
            self.vm_dead = False
            self._spawn(self._watch_vm(self.sandbox), "watch-vm")
            self._spawn(self._watch_oom(self.sandbox), "watch-oom")
            log.info("sandbox VM running (qemu pid %s)", self.sandbox.vm.pid if self.sandbox.vm else None)
            return self.sandbox

    def _join_cgroup(self, config: Config, spec: dict[str, Any]) -> None:
        """Move the shim, and so the QEMU and virtiofsd it starts, into the sandbox's host cgroup
        (pykata.resources.cgroups): the pod's `linux.cgroupsPath` with runtime.sandbox_cgroup_only.

        Raises InvalidArgument naming linux.cgroupsPath when the pod's path is refused."""
        linux = spec.get("linux")
        spec_path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
        try:
            cg = cgroups.join(config.runtime, spec_path, self.sandbox_id)
        except cgroups.CgroupError as e:
            if e.field == cgroups.FIELD:
                raise InvalidArgument(e.field, str(e).removeprefix(f"{e.field}: ")) from None
            if config.runtime.sandbox_cgroup_only:
                raise  # the admin asked for the pod's accounting: no VM outside it
            # the overhead cgroup is bookkeeping: a host whose cgroups pykata cannot write still runs pods
            log.warning("sandbox processes stay in the shim's cgroup: %s", e)
            return
        self._cgroup = (cg, config)

    def _leave_cgroup(self) -> None:
        """Once the VM is gone: the shim moves back out and the sandbox's cgroups are removed."""
        if self._cgroup is not None:
            cg, config = self._cgroup
            self._cgroup = None
            cgroups.leave(cg, config.runtime, self.sandbox_id)

    async def stop_sandbox(self) -> None:
        """Stop the VM (idempotent, shared by concurrent callers, bounded by the sandbox's own timeout).

        With no container left, nothing in the guest needs an orderly end (every process has ended,
        its files are written through to the host, the host mounts are undone): the agent is not
        asked to tear the guest down first, which under TCG costs a third of a second.
        """
        sb = self.sandbox
        if sb is None:
            return
        self._sandbox_stopping = True
        mark("vm.stop")
        if not self.containers:
            with contextlib.suppress(PykataError):
                await sb.disconnect_agent()
        await sb.stop(remove=True)
        mark("vm.stopped")

    async def _stop_if_unused(self) -> None:
        """After a failed Create: a sandbox with no container is stopped, and the next Create boots anew."""
        if self.sandbox is not None and not self.containers and not self._creating:
            async with self._sandbox_lock:
                if self.containers or self._creating:
                    return
                sb, self.sandbox = self.sandbox, None
                if sb is not None:
                    self._sandbox_stopping = True
                    await sb.stop(remove=True)
                self._leave_cgroup()

    async def _watch_vm(self, sb: Sandbox) -> None:
        assert sb.vm is not None
        with contextlib.suppress(Exception):
            await asyncio.shield(sb.vm.exited)
        if sb is not self.sandbox:
            return
        self.vm_dead = True
        if not self._sandbox_stopping:
            log.error("the sandbox VM exited unexpectedly; stopping every process with status %d",
                      VM_GONE_STATUS)
        for sc in list(self.containers.values()):
            for p in sc.processes():
                await self._record_exit(sc, p, VM_GONE_STATUS)

    async def _watch_oom(self, sb: Sandbox) -> None:
        failures = ignored = 0
        while not self._sandbox_stopping and not self.vm_dead:
            try:
                oom_cid = await sb.next_oom_event()
            except AgentCallError as e:
                if e.code in (Code.UNAVAILABLE, Code.UNIMPLEMENTED, Code.CANCELLED):
                    return
                failures += 1
                log.warning("GetOOMEvent: %s", e)
                await asyncio.sleep(min(5.0, float(failures)))
                continue
            except PykataError:
                return
            failures = 0
            if oom_cid in self.containers:
                log.warning("container %s: OOM kill", oom_cid)
                self._publish(events_pb2.TaskOOM(container_id=oom_cid))
            elif oom_cid:
                # containerd would mark that container, of some other pod maybe, OOM-killed
                ignored += 1
                if ignored in (1, 10, 100) or ignored % 1000 == 0:  # the log is the host's too
                    log.warning("the agent reported an OOM kill in %r, not a container of this pod: "
                                "ignored (%d so far)", oom_cid[:80], ignored)
            # The guest decides when GetOOMEvent returns: one answering at once, every time, must not
            # spin this loop (and the shim's CPU).
            await asyncio.sleep(OOM_POLL_INTERVAL)

    # -- process exits -----------------------------------------------------------------------------

    async def _record_exit(self, sc: ShimContainer, p: ShimProcess, status: int) -> None:
        async with p.lock:
            if not p.set_exited(status):
                return
            log.info("process %s exited with status %d", p.id, status)
            mark("exit.seen")
            if not sc.deleted and not p.deleted:
                self._publish(events_pb2.TaskExit(container_id=sc.id, id=p.id, pid=p.pid, exit_status=status,
                                                  exited_at=p.exited_at))

    async def _wait_process(self, sc: ShimContainer, p: ShimProcess) -> None:
        assert p.proc is not None
        try:
            status = await p.proc.wait()
        except AgentCallError as e:
            status = VM_GONE_STATUS if e.code == Code.UNAVAILABLE else 255
            log.warning("waiting for %s: %s (status %d)", p.id, e, status)
        except PykataError as e:
            status = 255
            log.warning("waiting for %s: %s", p.id, e)
        await self._record_exit(sc, p, status)

    # -- Task RPCs ---------------------------------------------------------------------------------

    async def Create(self, req: shim_pb2.CreateTaskRequest, ctx: Any) -> shim_pb2.CreateTaskResponse:
        cid = ids.check_id("id", req.id)
        current_container.set(cid)
        if self.shutting_down:
            raise FailedPrecondition("the shim is shutting down")
        if cid in self.containers or cid in self._creating:
            raise AlreadyExists(f"container {cid}: already exists")
        if req.checkpoint or req.parent_checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported")
        self._creating.add(cid)
        mark("rpc.create")
        try:
            return await self._create(req, cid)
        finally:
            self._creating.discard(cid)
            mark("rpc.create.done")

    async def _create(self, req: shim_pb2.CreateTaskRequest, cid: str) -> shim_pb2.CreateTaskResponse:
        bundle = Path(req.bundle)
        if not bundle.is_absolute():
            raise InvalidArgument("bundle", f"{req.bundle!r} is not an absolute path")
        spec = load_spec(bundle)
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        log.info("create: bundle %s, %d rootfs mounts, terminal=%s", bundle, len(req.rootfs), req.terminal)
        try:
            sandbox = await self._ensure_sandbox(spec)
            pio = await ProcessIO.open(stdio, container_id=cid, namespace=self.namespace)
            try:
                rootfs = [RootfsMount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
                if not rootfs:
                    root = (spec.get("root") or {}).get("path") or "rootfs"
                    rootfs = [RootfsMount("bind", str(bundle / root), ("rbind", "rw"))]
                with agent_errors(f"create {cid}"):
                    container = await sandbox.create_container(cid, spec, rootfs, terminal=req.terminal)
            except BaseException:
                await pio.close()
                raise
        except BaseException:
            await asyncio.shield(self._stop_if_unused_after(cid))
            raise
        sc = ShimContainer(cid, bundle, spec, stdio, list(req.rootfs))
        sc.sandbox_container = container
        sc.init.proc, sc.init.io = container.init, pio
        sc.init.pid, sc.init.guest_pid = self._host_pid(), container.init.pid
        self.containers[cid] = sc
        pio.attach(container.init)
        sc.init.waiter = self._spawn(self._wait_process(sc, sc.init), f"wait-{cid}")
        for name, value in (("init.pid", sc.init.pid), ("shim.pid", os.getpid())):
            with contextlib.suppress(OSError):
                (bundle / name).write_text(str(value))
        self._publish(events_pb2.TaskCreate(
            container_id=cid, bundle=req.bundle, rootfs=req.rootfs, pid=sc.init.pid, checkpoint=req.checkpoint,
            io=events_pb2.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)))
        log.info("created, pid %d in the guest", sc.init.guest_pid)
        return shim_pb2.CreateTaskResponse(pid=sc.init.pid)

    async def _stop_if_unused_after(self, cid: str) -> None:
        self._creating.discard(cid)
        with contextlib.suppress(PykataError):
            await self._stop_if_unused()

    async def Start(self, req: shim_pb2.StartRequest, ctx: Any) -> shim_pb2.StartResponse:
        sc = self._container(req.id)
        p = sc.process(req.exec_id)
        phase = "rpc.exec" if req.exec_id else "rpc.start"
        mark(phase)
        # to completion even if containerd hangs up: a process started in the guest is known as such
        resp = await self._to_completion(self._start(sc, p), f"start-{p.id}")
        mark(f"{phase}.done")
        return resp

    async def _start(self, sc: ShimContainer, p: ShimProcess) -> shim_pb2.StartResponse:
        async with p.lock:
            if p.deleted or sc.deleted:
                raise NotFound(f"process {p.id} was deleted")
            if p.state != "created":
                raise FailedPrecondition(f"cannot start a {p.state} process")
            if p is sc.init:
                assert sc.sandbox_container is not None
                self._agent_sandbox()
                with agent_errors(f"start {sc.id}"):
                    await sc.sandbox_container.start()
                p.state = "running"
                self._publish(events_pb2.TaskStart(container_id=sc.id, pid=p.pid))
            else:
                try:
                    await self._start_exec(sc, p)
                except BaseException:
                    # Never started (e.g. the agent policy refused it): nothing will exit, so end it
                    # here; a Wait returns and containerd's readers of its stdio see EOF.
                    if p.state == "created":
                        p.set_exited(EXEC_FAILED_STATUS)
                        if p.io is not None:
                            await p.io.close()
                    raise
                self._publish(events_pb2.TaskExecStarted(container_id=sc.id, exec_id=p.exec_id, pid=p.pid))
        log.info("started %s, pid %d in the guest", p.id, p.guest_pid)
        return shim_pb2.StartResponse(pid=p.pid)

    async def _start_exec(self, sc: ShimContainer, p: ShimProcess) -> None:
        if sc.init.state != "running":
            raise FailedPrecondition(f"cannot exec in a {sc.init.state} container")
        if sc.paused:
            raise FailedPrecondition("cannot exec in a paused container")
        self._agent_sandbox()
        assert sc.sandbox_container is not None
        proc = exec_process(p.spec, terminal=p.stdio.terminal, console_size=p.console_size)
        with agent_errors(f"exec {p.exec_id} in {sc.id}"):
            p.proc = await sc.sandbox_container.exec_process(p.exec_id, proc)
        p.pid, p.guest_pid, p.state = self._host_pid(), p.proc.pid, "running"
        if p.io is not None:
            p.io.attach(p.proc)
        p.waiter = self._spawn(self._wait_process(sc, p), f"wait-{sc.id}-{p.exec_id}")

    async def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: Any) -> Empty:
        exec_id = ids.check_exec_id(req.exec_id, "exec_id")
        sc = self._container(req.id)
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
            p.io = await ProcessIO.open(stdio, container_id=sc.id, namespace=self.namespace)
        except BaseException:
            sc.execs.pop(exec_id, None)
            raise
        self._publish(events_pb2.TaskExecAdded(container_id=sc.id, exec_id=exec_id))
        return Empty()

    async def Delete(self, req: shim_pb2.DeleteRequest, ctx: Any) -> shim_pb2.DeleteResponse:
        current_container.set(req.id)
        mark("rpc.delete")
        sc = self.containers.get(req.id)  # also while its deletion runs: a second Delete waits for it
        if sc is None:
            raise NotFound(f"container {req.id}: container not created")
        if req.exec_id:
            return await self._delete_exec(sc, sc.process(req.exec_id))
        mine = False
        if sc.deleting is None:
            async with sc.init.lock:  # not in the middle of a Start
                if sc.deleting is None:
                    if sc.init.state == "running":
                        raise FailedPrecondition(f"container {sc.id}: cannot delete a running process")
                    sc.deleted = True
                    # a task of its own: containerd closing the connection cancels this RPC, and a
                    # deletion cut in half would leave the container, and with it the VM, behind
                    sc.deleting = self._spawn(self._delete_container(sc), f"delete-{sc.id}")
                    mine = True
        resp: shim_pb2.DeleteResponse = await asyncio.shield(sc.deleting)
        if not mine:  # containerd takes NOT_FOUND as "already deleted"
            raise NotFound(f"container {sc.id}: cannot delete a deleted process")
        return resp

    async def _delete_container(self, sc: ShimContainer) -> shim_pb2.DeleteResponse:
        init = sc.init
        log.info("delete (status %s, exit %d)", init.state, init.exit_status)
        if init.io is not None:
            await init.io.wait_output(IO_DRAIN_TIMEOUT)
        for p in sc.processes():
            if p.io is not None:
                await p.io.close()
        # the VM goes down after the sandbox's own (or the last) container: removing it in the guest
        # first would only cost time (its processes have all ended: Delete needs the init stopped)
        stop_vm = sc.id == self.sandbox_id or all(c is sc for c in self.containers.values())
        if sc.sandbox_container is not None:  # idempotent; with the VM gone it only undoes host mounts
            await sc.sandbox_container.delete(in_guest=not stop_vm and not self.vm_dead)
        for p in sc.processes():
            # a process never started (or the rest of a dead VM) ends here; Wait callers return
            p.set_exited(VM_GONE_STATUS if p.state != "stopped" else p.exit_status)
            if p.waiter is not None:
                p.waiter.cancel()
        self.containers.pop(sc.id, None)
        self._publish(events_pb2.TaskDelete(container_id=sc.id, id=sc.id, pid=init.pid,
                                            exit_status=init.exit_status, exited_at=_ts(init.exited_at)))
        if stop_vm:
            # containerd gets its answer while the VM goes down: it overlaps with containerd's own
            # cleanup; the shim exits only once the VM is gone (close() waits for the same stop)
            self._sandbox_stopping = True
            self._spawn(self.stop_sandbox(), "stop-sandbox")
        if self._exit_when_empty and not self.containers and not self._creating:
            self._begin_exit()
        mark("rpc.delete.done")
        return shim_pb2.DeleteResponse(pid=init.pid, exit_status=init.exit_status, exited_at=_ts(init.exited_at))

    async def _delete_exec(self, sc: ShimContainer, p: ShimProcess) -> shim_pb2.DeleteResponse:
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
        return shim_pb2.DeleteResponse(pid=p.pid, exit_status=p.exit_status, exited_at=_ts(p.exited_at))

    async def State(self, req: shim_pb2.StateRequest, ctx: Any) -> shim_pb2.StateResponse:
        sc = self._container(req.id)
        p = sc.process(req.exec_id)
        s = p.stdio
        return shim_pb2.StateResponse(
            id=p.id, bundle=str(sc.bundle), pid=p.pid, status=sc.status(p), stdin=s.stdin, stdout=s.stdout,
            stderr=s.stderr, terminal=s.terminal, exit_status=p.exit_status, exited_at=_ts(p.exited_at),
            exec_id=p.exec_id)

    async def Pids(self, req: shim_pb2.PidsRequest, ctx: Any) -> shim_pb2.PidsResponse:
        sc = self._container(req.id)
        out = shim_pb2.PidsResponse()
        for p in sc.processes():
            if p.state != "running":
                continue
            info = out.processes.add(pid=p.pid)
            if p.exec_id:
                info.info.CopyFrom(typeurl.pack(runc_options_pb2.ProcessDetails(exec_id=p.exec_id)))
        return out

    async def Pause(self, req: shim_pb2.PauseRequest, ctx: Any) -> Empty:
        sc = self._container(req.id)
        return await self._to_completion(self._pause(sc), f"pause-{sc.id}")

    async def _pause(self, sc: ShimContainer) -> Empty:
        async with sc.lock:
            if sc.init.state != "running" or sc.deleted:
                raise FailedPrecondition(f"cannot pause a {sc.init.state} container")
            if sc.paused:
                raise FailedPrecondition("cannot pause a paused container")
            sandbox = self._agent_sandbox()
            with agent_errors(f"pause {sc.id}"):
                await sandbox.pause_container(sc.id)
            sc.paused = True
            self._publish(events_pb2.TaskPaused(container_id=sc.id))
        return Empty()

    async def Resume(self, req: shim_pb2.ResumeRequest, ctx: Any) -> Empty:
        sc = self._container(req.id)
        return await self._to_completion(self._resume(sc), f"resume-{sc.id}")

    async def _resume(self, sc: ShimContainer) -> Empty:
        async with sc.lock:
            if not sc.paused or sc.deleted:
                raise FailedPrecondition(f"cannot resume a container that is not paused ({sc.init.state})")
            sandbox = self._agent_sandbox()
            with agent_errors(f"resume {sc.id}"):
                await sandbox.resume_container(sc.id)
            sc.paused = False
            self._publish(events_pb2.TaskResumed(container_id=sc.id))
        return Empty()

    async def Kill(self, req: shim_pb2.KillRequest, ctx: Any) -> Empty:
        sc = self._container(req.id)
        p = sc.process(req.exec_id)
        if p.exec_id and p.state == "created":
            raise FailedPrecondition(f"exec {p.exec_id}: process not created")
        if p.state == "stopped" or self.vm_dead:
            raise NotFound(f"{p.id}: process already finished")
        if not 0 < req.signal < 65:
            raise InvalidArgument("signal", f"{req.signal} is not a signal number")
        sandbox = self._agent_sandbox()
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
                await self._kill_vm(f"the agent did not kill {p.id}: {e}")
                return Empty()
            raise
        return Empty()

    async def _kill_vm(self, why: str) -> None:
        """Stop the sandbox's VM (its processes are then recorded as killed, as when the VM dies)."""
        sb = self.sandbox
        if sb is None or sb.vm is None or self.vm_dead:
            return
        log.error("%s; stopping the sandbox VM", why)
        await sb.vm.stop()
        await asyncio.shield(sb.vm.exited)

    async def ResizePty(self, req: shim_pb2.ResizePtyRequest, ctx: Any) -> Empty:
        sc = self._container(req.id)
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

    async def CloseIO(self, req: shim_pb2.CloseIORequest, ctx: Any) -> Empty:
        sc = self._container(req.id)
        p = sc.process(req.exec_id)
        if req.stdin and p.io is not None:
            await p.io.close_stdin()
        return Empty()

    async def Checkpoint(self, req: shim_pb2.CheckpointTaskRequest, ctx: Any) -> Empty:
        raise Unimplemented("checkpoint is not supported by pykata")

    async def Update(self, req: shim_pb2.UpdateTaskRequest, ctx: Any) -> Empty:
        sc = self._container(req.id)
        try:
            resources = typeurl.unpack_json(req.resources, typeurl.OCI_LINUX_RESOURCES_URL)
        except typeurl.TypeURLError as e:
            raise InvalidArgument("resources", str(e)) from None
        if not isinstance(resources, dict):
            raise InvalidArgument("resources", "must be an OCI LinuxResources object")
        sandbox = self._agent_sandbox()
        with agent_errors(f"update {sc.id}"):
            await sandbox.update_container(sc.id, resources)
        return Empty()

    async def Wait(self, req: shim_pb2.WaitRequest, ctx: Any) -> shim_pb2.WaitResponse:
        sc = self._container(req.id)
        p = sc.process(req.exec_id)
        await p.exited.wait()
        return shim_pb2.WaitResponse(exit_status=p.exit_status, exited_at=_ts(p.exited_at))

    async def Stats(self, req: shim_pb2.StatsRequest, ctx: Any) -> shim_pb2.StatsResponse:
        sc = self._container(req.id)
        sandbox = self._agent_sandbox()
        with agent_errors(f"stats {sc.id}"):
            stats = await sandbox.stats_container(sc.id)
        return shim_pb2.StatsResponse(stats=metrics_any(stats))

    async def Connect(self, req: shim_pb2.ConnectRequest, ctx: Any) -> shim_pb2.ConnectResponse:
        sc = self.containers.get(req.id)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=sc.init.pid if sc is not None else 0)

    async def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: Any) -> Empty:
        current_container.set(req.id)
        mark("rpc.shutdown")
        if req.now:
            self._begin_exit()
            return Empty()
        if self._creating or any(sc.deleting is None for sc in self.containers.values()):
            return Empty()  # the shim still serves containers
        if self.containers:
            # only containers being deleted are left (a Delete racing this Shutdown): end after them
            self._exit_when_empty = True
            return Empty()
        self._begin_exit()
        return Empty()

    def _begin_exit(self) -> None:
        if self.shutting_down:
            return
        log.info("shutdown: no containers left, the shim exits")
        self.shutting_down = True
        if self._on_exit is not None:
            self._on_exit()
        # after the reply to the RPC that ended the shim is written (the daemon also waits for it)
        asyncio.get_running_loop().call_soon(self.exit_requested.set)

    # -- end of the shim ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the sandbox and every copy of stdio; called once the shim is to exit."""
        self.shutting_down = True
        for sc in list(self.containers.values()):
            for p in sc.processes():
                if p.io is not None:
                    with contextlib.suppress(PykataError, OSError):
                        await p.io.close()
        await self.stop_sandbox()
        self._leave_cgroup()
        for t in list(self._background):
            t.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=2.0)


def _pod_config(annotations: dict[str, str]) -> Config:
    """The pod's configuration (load_for_annotations).

    Raises InvalidArgument naming the `io.katacontainers.*` annotation that is bad or not
    allowed (the pod's mistake); ConfigError for the host's own configuration file.
    """
    try:
        return load_for_annotations(annotations)
    except ConfigError as e:
        if not e.field.startswith("io.katacontainers."):
            raise
        raise InvalidArgument(e.field, str(e).removeprefix(f"{e.field}: ")) from None


def _vm_size(spec: dict[str, Any], config: Config) -> tuple[Config, int | None, int | None]:
    """The configuration, vCPUs and MiB (None: the default) for the sandbox VM, from the pod's sandbox
    annotations and the container's limits (pykata.resources.sizing: a VM larger than the configured one
    boots cold, without a template).

    Raises InvalidArgument naming the annotation or spec field with a bad value.
    """
    return sizing.fit(config, sizing.pod_size(spec))


async def _remove_dead_leftover(config: Config, sandbox_id: str) -> None:
    """Make room for the sandbox: a directory of the same id whose shim is still on its way out (the
    same container id run again right away) is waited for, one whose shim died is removed; one whose
    owner lives on is left alone (Sandbox.create then refuses the id)."""
    from pykata.sandbox import state
    from pykata.sandbox.lookup import remove_sandbox_dir

    directory = sandboxes_dir(config) / sandbox_id
    deadline = time.monotonic() + LEFTOVER_WAIT
    while directory.exists() and time.monotonic() < deadline:
        record = state.load(directory)
        if record is None or not record.owner_alive():
            log.warning("removing sandbox %s left by a dead shim", sandbox_id)
            remove_sandbox_dir(directory, record)
            return
        await asyncio.sleep(0.05)
