"""The AgentService handlers: check each request, then hand it to containers/sandbox/guest code.

    agent = AgentService(AgentSettings(state_dir=...))
    await agent.start()                      # reaper, crun lookup, state directories
    server.register(AGENT_SERVICE, agent)
    ...
    await agent.close()
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp

# network is imported with the agent, not at the first UpdateInterface: a VM cloned from a template
# resumes this process, so no clone pays for the import (~90 ms under TCG in a fresh guest, on a
# CRI pod's start path)
from pykata.agent import guest, metrics, network, volumesync
from pykata.agent.console import DebugConsole
from pykata.agent.containers import Containers
from pykata.agent.crun import Crun, find_crun
from pykata.agent.entropy import Entropy
from pykata.agent.processes import Process
from pykata.agent.reaper import Reaper
from pykata.agent.sandbox import Sandbox
from pykata.agent.settings import AgentSettings
from pykata.agent.spawner import Spawner
from pykata.agent.stats import OOMWatcher, read_stats
from pykata.agent.stdio import OutputStream
from pykata.agent.storage import POD_VOLUME_RE, Storages
from pykata.agent.validation import MAX_IO_CHUNK, check_exec_id
from pykata.errors import FailedPrecondition, Internal, InvalidArgument, PykataError, Unavailable
from pykata.protocols.agent import agent_pb2

log = logging.getLogger("pykata.agent.service")

# The throwaway container of precompile_seccomp: an id no request can use (pykata.ids wants a letter or
# digit first), so it never meets a pod's container in crun's state, bundles or cgroups.
PRECOMPILE_ID = "_pykata-seccomp"

DEFAULT_READ = 64 << 10
DESTROY_TIMEOUT = 30.0


def ensure_std_fds() -> None:
    """Open /dev/null on any of 0/1/2 that is closed, so pipes never get those numbers."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background onlining of CPUs/memory failed: %s", task.exception())


MAX_OUTPUT_WAIT_MS = 10_000  # WaitProcess output_wait_ms cap: a reply never waits longer on its account


async def _exit_or_output(proc: Process, limit: int, within: float | None = None) -> bool:
    """Wait until the process exits (True) or one of its streams holds `limit` bytes (False): a
    process printing more than the buffers hold would otherwise block, and never exit. With
    `within` (seconds), False as well once that has passed."""
    exited = asyncio.ensure_future(proc.wait())
    waits: list[asyncio.Future[Any]] = [exited]
    waits += [asyncio.ensure_future(s.wait_buffered(limit)) for s in (proc.stdout, proc.stderr) if s is not None]
    try:
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if not exited.done() or exited.cancelled():
        return False
    exited.exception()  # retrieved: the caller's own wait() raises it (never started) again
    return True


class AgentService:
    """Handlers for `pykata.agent.v1.AgentService`."""

    def __init__(self, settings: AgentSettings | None = None) -> None:
        self.settings = settings or AgentSettings()
        self.reaper = Reaper()
        self.oom: OOMWatcher | None = None
        self.spawner: Spawner | None = None
        self._containers: Containers | None = None
        self._sandbox: Sandbox | None = None
        self._storages: Storages | None = None
        # Per volume: the asyncio lock orders the calls applied in worker threads, and their count (those
        # waiting included) keeps a small tree's call from overtaking them in the loop's thread; the
        # thread lock is held by whichever thread mounts and applies, so a call cancelled mid-apply (its
        # host session gone) cannot let a later call's tree be applied beside, or before, the tree its
        # thread is still writing.
        self._volume_locks: dict[str, asyncio.Lock] = {}
        self._volume_calls: dict[str, int] = {}
        self._volume_thread_locks: dict[str, threading.Lock] = {}
        # the tree last applied to each copied volume (at most volumesync.MAX_BYTES of data each): what a
        # failed update is rolled back to
        self._volume_trees: dict[str, dict[str, agent_pb2.VolumeEntry]] = {}
        self._dirs_made = False
        self.entropy = Entropy(self.settings.state_dir)
        self.console = DebugConsole(self.reaper, buffer_limit=self.settings.buffer_limit)

    def _make_dirs(self) -> None:
        """Raises Internal when the state directories cannot be made."""
        if not self._dirs_made:
            try:
                self.settings.make_dirs()
            except OSError as exc:
                raise Internal(f"cannot make the agent's directories: {exc}") from None
            self._dirs_made = True

    async def start(self) -> None:
        """Start reaping. A missing crun is logged and reported by the container RPCs; the state
        directories are made by the first call that needs them, so an agent that only answers
        Health leaves nothing behind."""
        ensure_std_fds()
        s = self.settings
        self.reaper.start()
        storages = self._storages = Storages(s.mount_roots, s.source_roots, pod_volume_root=s.pod_volume_dir,
                                             share_root=s.shared)
        try:
            binary = find_crun(s.crun)
        except FileNotFoundError as exc:
            # Keep serving (Health, guest RPCs); container RPCs will report it.
            log.error("%s", exc)
            binary = s.crun
        crun = Crun(self.reaper, binary, s.crun_root, s.log_dir)
        self.oom = OOMWatcher()
        if s.native_exec and s.exec_spawner:
            self.spawner = Spawner(self.reaper)
            try:
                self.spawner.start()
            except OSError as exc:
                log.warning("no exec spawner (the agent forks exec children itself): %s", exc)
        self._containers = Containers(s, self.reaper, crun, storages, self.oom, spawner=self.spawner)
        self._sandbox = Sandbox(s, self.reaper, storages)
        # The default executor's first worker thread, made now: a VM cloned from a template resumes
        # this very process, so its first RPC that runs in a thread (ReseedRandomDev, a container's
        # mounts) finds one waiting instead of making one, which is slow under TCG.
        await asyncio.to_thread(int)

    async def close(self) -> None:
        """Stop background work (containers keep running; DestroySandbox removes them)."""
        self.console.close()
        if self.spawner is not None:
            self.spawner.close()
        if self.oom is not None:
            await self.oom.close()
        self.reaper.close()
        self.entropy.close()

    @property
    def containers(self) -> Containers:
        if self._containers is None:
            raise Unavailable("agent is not started")
        return self._containers

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            raise Unavailable("agent is not started")
        return self._sandbox

    # -- sandbox -------------------------------------------------------------------------------

    async def CreateSandbox(self, req: agent_pb2.CreateSandboxRequest, ctx: Any) -> Empty:
        self._make_dirs()
        await self.sandbox.create(req)
        if req.debug_console:
            self.console.enable()
        return Empty()

    async def DestroySandbox(self, req: agent_pb2.DestroySandboxRequest, ctx: Any) -> Empty:
        timeout = float(req.timeout_seconds or DESTROY_TIMEOUT)
        self.console.close()
        errors = await self.containers.remove_all(timeout)
        errors += await self.sandbox.destroy()
        if errors:
            raise Internal("; ".join(errors)[:4000])
        return Empty()

    # -- containers ----------------------------------------------------------------------------

    async def CreateContainer(self, req: agent_pb2.CreateContainerRequest,
                              ctx: Any) -> agent_pb2.CreateContainerResponse:
        self._make_dirs()
        pid_ns = None
        if req.sandbox_pidns and req.pid_ns_container:
            raise InvalidArgument("pid_ns_container", "not with sandbox_pidns: one pid namespace to join")
        if req.sandbox_pidns:
            pid_ns = self.sandbox.pid_ns_path()
            if pid_ns is None:
                raise FailedPrecondition("sandbox_pidns: the sandbox has no shared pid namespace")
        elif req.pid_ns_container:
            pid_ns = self.containers.pid_ns_path(req.pid_ns_container)
        extra = self.sandbox.extra_mounts() + self.entropy.container_mounts()
        c = await self.containers.create(req, pid_ns_path=pid_ns, extra_mounts=extra)
        return agent_pb2.CreateContainerResponse(pid=c.init.pid)

    async def StartContainer(self, req: agent_pb2.StartContainerRequest,
                             ctx: Any) -> agent_pb2.StartContainerResponse:
        return agent_pb2.StartContainerResponse(pid=await self.containers.start(req.container_id))

    async def RemoveContainer(self, req: agent_pb2.RemoveContainerRequest, ctx: Any) -> Empty:
        await self.containers.remove(req.container_id, float(req.timeout_seconds) or None)
        return Empty()

    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest, ctx: Any) -> agent_pb2.ExecProcessResponse:
        if not req.HasField("process"):
            raise InvalidArgument("process", "missing")
        if len(req.stdin) > MAX_IO_CHUNK:
            raise InvalidArgument("stdin", f"{len(req.stdin)} bytes, at most {MAX_IO_CHUNK}")
        pid = await self.containers.exec(req.container_id, req.exec_id, req.process)
        resp = agent_pb2.ExecProcessResponse(pid=pid)
        if req.stdin or req.close_stdin:
            # the host's input for a short command, in this same round trip (no WriteStdin/CloseStdin)
            stdin = self.containers.get(req.container_id).process(req.exec_id).stdin
            if stdin is not None:
                resp.stdin_written = stdin.write_now(req.stdin)
                if req.close_stdin and resp.stdin_written == len(req.stdin):
                    stdin.close()
                    resp.stdin_closed = True
        return resp

    async def WriteFileFromDisk(self, req: agent_pb2.DiskFileRequest, ctx: Any) -> agent_pb2.DiskFileResponse:
        if not req.HasField("process"):
            raise InvalidArgument("process", "missing")
        return await self.containers.disk_file(req, write=True)

    async def ReadFileToDisk(self, req: agent_pb2.DiskFileRequest, ctx: Any) -> agent_pb2.DiskFileResponse:
        if not req.HasField("process"):
            raise InvalidArgument("process", "missing")
        return await self.containers.disk_file(req, write=False)

    async def SignalProcess(self, req: agent_pb2.SignalProcessRequest, ctx: Any) -> Empty:
        if not req.container_id and self.console.enabled:  # a debug console process
            self.console.get(req.exec_id).signal(req.signal)
            return Empty()
        await self.containers.signal(req.container_id, req.exec_id, req.signal, req.all)
        return Empty()

    async def WaitProcess(self, req: agent_pb2.WaitProcessRequest, ctx: Any) -> agent_pb2.WaitProcessResponse:
        proc = self._process(req.container_id, req.exec_id)
        limit = min(req.output_limit, MAX_IO_CHUNK)
        within = min(req.output_wait_ms, MAX_OUTPUT_WAIT_MS) / 1000 if req.output_wait_ms else None
        if limit and proc.exit_status is None and not await _exit_or_output(proc, limit, within):
            resp = agent_pb2.WaitProcessResponse(running=True)
        else:
            status = await proc.wait()
            at = Timestamp()
            at.FromNanoseconds(int(status.at * 1e9))
            resp = agent_pb2.WaitProcessResponse(exit_status=status.code, exited_at=at)
        if limit:
            # what a short command printed, with its exit: no ReadStdout/ReadStderr round trips
            resp.output = True
            resp.stdout, resp.stdout_eof = proc.stdout.take_now(limit) if proc.stdout else (b"", True)
            resp.stderr, resp.stderr_eof = proc.stderr.take_now(limit) if proc.stderr else (b"", True)
        return resp

    async def UpdateContainer(self, req: agent_pb2.UpdateContainerRequest, ctx: Any) -> Empty:
        await self.containers.update(req.container_id, req.linux_resources_json)
        return Empty()

    async def StatsContainer(self, req: agent_pb2.StatsContainerRequest,
                             ctx: Any) -> agent_pb2.StatsContainerResponse:
        c = self.containers.get(req.container_id)
        stats = await asyncio.to_thread(read_stats, c.cgroup)
        # the containers share the guest's network namespace: its counters are theirs
        return agent_pb2.StatsContainerResponse(cgroup_stats=stats, network_stats=metrics.network())

    async def PauseContainer(self, req: agent_pb2.PauseContainerRequest, ctx: Any) -> Empty:
        await self.containers.pause(req.container_id)
        return Empty()

    async def ResumeContainer(self, req: agent_pb2.ResumeContainerRequest, ctx: Any) -> Empty:
        await self.containers.resume(req.container_id)
        return Empty()

    # -- stdio ---------------------------------------------------------------------------------

    def _process(self, container_id: str, exec_id: str) -> Process:
        if not container_id and self.console.enabled:  # a debug console process
            return self.console.get(exec_id)
        c = self.containers.get(container_id)
        return c.process(check_exec_id("exec_id", exec_id))

    async def WriteStdin(self, req: agent_pb2.WriteStreamRequest, ctx: Any) -> agent_pb2.WriteStreamResponse:
        proc = self._process(req.container_id, req.exec_id)
        if len(req.data) > MAX_IO_CHUNK:
            raise InvalidArgument("data", f"{len(req.data)} bytes, at most {MAX_IO_CHUNK} per call")
        if proc.stdin is None:
            raise FailedPrecondition(f"process {proc.name} has no stdin")
        return agent_pb2.WriteStreamResponse(length=await proc.stdin.write(req.data))

    async def _read(self, stream: OutputStream | None, max_length: int) -> agent_pb2.ReadStreamResponse:
        if stream is None:
            return agent_pb2.ReadStreamResponse(eof=True)
        data, eof = await stream.read(min(max_length or DEFAULT_READ, MAX_IO_CHUNK))
        return agent_pb2.ReadStreamResponse(data=data, eof=eof)

    async def ReadStdout(self, req: agent_pb2.ReadStreamRequest, ctx: Any) -> agent_pb2.ReadStreamResponse:
        return await self._read(self._process(req.container_id, req.exec_id).stdout, req.max_length)

    async def ReadStderr(self, req: agent_pb2.ReadStreamRequest, ctx: Any) -> agent_pb2.ReadStreamResponse:
        return await self._read(self._process(req.container_id, req.exec_id).stderr, req.max_length)

    async def CloseStdin(self, req: agent_pb2.CloseStdinRequest, ctx: Any) -> Empty:
        proc = self._process(req.container_id, req.exec_id)
        if proc.stdin is not None:
            proc.stdin.close()
        return Empty()

    async def TtyWinResize(self, req: agent_pb2.TtyWinResizeRequest, ctx: Any) -> Empty:
        proc = self._process(req.container_id, req.exec_id)
        for name, value in (("rows", req.rows), ("columns", req.columns)):
            if value > 0xFFFF:
                raise InvalidArgument(name, f"{value} is larger than 65535")
        proc.resize(req.rows, req.columns)
        return Empty()

    # -- events and guest ----------------------------------------------------------------------

    async def GetOOMEvent(self, req: agent_pb2.GetOOMEventRequest, ctx: Any) -> agent_pb2.OOMEvent:
        if self.oom is None:
            raise Unavailable("agent is not started")
        return agent_pb2.OOMEvent(container_id=await self.oom.next_event())

    async def GetGuestDetails(self, req: agent_pb2.GuestDetailsRequest,
                              ctx: Any) -> agent_pb2.GuestDetailsResponse:
        return guest.details(req.mem_block_size, cgroup_root=self.settings.cgroup_root)

    async def OnlineCPUMem(self, req: agent_pb2.OnlineCPUMemRequest, ctx: Any) -> Empty:
        work = asyncio.to_thread(guest.online_cpu_mem, req.nb_cpus, req.cpu_only)
        if req.wait:
            await work
        else:
            asyncio.ensure_future(work).add_done_callback(_log_failure)
        return Empty()

    async def GetGuestMetrics(self, req: agent_pb2.GuestMetricsRequest, ctx: Any) -> agent_pb2.GuestMetrics:
        processes = len(self.console.processes)
        if self._containers is not None:
            processes += self._containers.process_count()
        return metrics.guest_metrics(processes)

    async def StartDebugConsole(self, req: agent_pb2.DebugConsoleRequest,
                                ctx: Any) -> agent_pb2.ExecProcessResponse:
        try:
            pid = await self.console.start(req)
        except OSError as exc:
            raise Internal(f"args: cannot start {req.args[0] if req.args else 'the shell'!r}: "
                           f"{exc.strerror or exc}") from None
        return agent_pb2.ExecProcessResponse(pid=pid)

    def SetGuestDateTime(self, req: agent_pb2.SetGuestDateTimeRequest, ctx: Any) -> Empty:
        # a plain function (pykata.agent.main.IMMEDIATE_RPCS)
        guest.set_time(req.sec, req.usec)
        return Empty()

    async def CopyFile(self, req: agent_pb2.CopyFileRequest, ctx: Any) -> Empty:
        self._make_dirs()
        try:
            await asyncio.to_thread(guest.copy_file, req, [self.settings.shared])
        except OSError as exc:
            raise Internal(f"path: {req.path!r}: {exc.strerror or exc}") from None
        return Empty()

    def SyncVolume(self, req: agent_pb2.SyncVolumeRequest, ctx: Any) -> Empty | Awaitable[Empty]:
        """A pod volume copied in by the host (pykata.agent.volumesync): its tmpfs is mounted by the
        first call (a pod volume: it stays until DestroySandbox), and each call makes its tree the one
        given. Calls for one volume take turns.

        A plain function (pykata.agent.main.IMMEDIATE_RPCS): a small tree (volumesync.small: a CRI
        pod's /etc files, a small configmap) is applied here, in the loop turn that read the call, when
        no earlier call of the volume is still at work; else this hands back the awaitable that applies
        it in a worker thread after them."""
        self._make_dirs()
        if self._storages is None:
            raise Unavailable("the agent is starting")
        if not POD_VOLUME_RE.match(req.name):
            raise InvalidArgument("name", f"{req.name[:80]!r} is not a volume name (a DNS-1123 label)")
        tree = volumesync.check_entries(req.entries)
        size = min(max(req.size, 1 << 20), volumesync.MAX_TMPFS)
        top = tree[""]
        where = self.settings.pod_volume_dir / req.name
        storage = agent_pb2.Storage(driver="tmpfs", source="tmpfs", fstype="tmpfs", mount_point=str(where),
                                    options=["nosuid", "nodev", f"size={size >> 10}k", f"mode={top.mode & 0o777:o}",
                                             f"uid={top.uid}", f"gid={top.gid}"])
        thread_lock = self._volume_thread_locks.setdefault(req.name, threading.Lock())
        storages = self._storages

        def sync() -> None:
            # with thread_lock held
            previous = self._volume_trees.get(req.name)
            # the volume's first tree, into the tmpfs mounted just now: made in place
            fresh = previous is None and not storages.has_pod_volume(str(where))
            storages.mount(storage, "volume")
            try:
                # all or nothing: a failed update leaves the last tree applied (volumesync.apply)
                volumesync.apply(where, tree, previous, fresh=fresh)
            except OSError as exc:
                raise Internal(f"entries: volume {req.name}: {exc.strerror or exc}; the last update "
                               "applied is kept") from None
            self._volume_trees[req.name] = tree

        # a call waiting for its turn (or at work) keeps later ones behind it, in the order they came
        if not self._volume_calls.get(req.name) and volumesync.small(tree) and thread_lock.acquire(blocking=False):
            try:
                sync()
            finally:
                thread_lock.release()
            return Empty()
        # counted from now until the task is done, however it ends (even cancelled before it began)
        self._volume_calls[req.name] = self._volume_calls.get(req.name, 0) + 1
        task = asyncio.ensure_future(self._sync_volume_later(req.name, thread_lock, sync))
        task.add_done_callback(lambda _: self._volume_calls.__setitem__(req.name, self._volume_calls[req.name] - 1))
        return task

    async def _sync_volume_later(self, name: str, thread_lock: threading.Lock, sync: Callable[[], None]) -> Empty:
        """SyncVolume's apply in a worker thread, after the volume's earlier calls. The thread holds
        `thread_lock`, so a call cancelled mid-apply (its host session gone) cannot let a later call's
        tree be applied beside, or before, the tree its thread is still writing."""
        def locked() -> None:
            with thread_lock:
                sync()

        async with self._volume_locks.setdefault(name, asyncio.Lock()):
            await asyncio.to_thread(locked)
        return Empty()

    def ReseedRandomDev(self, req: agent_pb2.ReseedRandomDevRequest, ctx: Any) -> agent_pb2.ReseedRandomDevResponse:
        # a plain function (pykata.agent.main.IMMEDIATE_RPCS)
        self._make_dirs()
        # In the loop's thread: a few syscalls, and a template clone's first handoff to a worker thread
        # (its wakeups, the GIL's handover, the loop's self-pipe) is guest code TCG translates afresh.
        return self.entropy.reseed(req, containers_exist=len(self.containers) > 0)

    async def WarmUp(self, req: agent_pb2.WarmUpRequest, ctx: Any) -> Empty:
        """A throwaway container, created and deleted (pykata.agent.warmup). Refused once the
        sandbox or a container exists: it is for a VM no pod has yet."""
        from pykata.agent import warmup

        if self.sandbox.created or len(self.containers) > 0:
            raise FailedPrecondition("WarmUp: this VM already serves a pod")
        self._make_dirs()
        try:
            await warmup.warm_up(self.containers.crun, self.settings, self.entropy.container_mounts())
        except OSError as exc:
            raise Internal(f"warm-up: {exc}") from None
        return Empty()

    async def precompile_seccomp(self) -> None:
        """Compile containerd's RuntimeDefault seccomp profile (pykata.agent.seccompdefault) into the
        containers' SeccompCache, through a throwaway container (pykata.agent.warmup) whose program crun
        leaves in its state directory. Run by the agent itself right after its ready line, in the VM
        only, at nice 19, unless a host spoke by then (a cold boot, whose pod's requests it would slow:
        pykata.agent.main._then_settled): in a VM template that is before any host session, so the
        template is saved with the program (its maker waits for the guest to idle) and every clone's first CRI container
        loads it instead of compiling it. The program comes from the agent's own crun, compiled from a
        profile built into the agent, before any pod exists: nothing a pod sends reaches it, and no
        program ever comes from another VM (a clone starts with its template's, made by the host's
        admin before any pod). Skipped once a sandbox or a container exists; never raises (a failure is
        logged: containers then compile their profile as before). It binds the boot id file ahead too
        (Entropy.prepare_boot_id)."""
        from pykata.agent import seccompcache, seccompdefault, warmup

        if self.sandbox.created or len(self.containers) > 0:
            return
        try:
            self._make_dirs()
        except PykataError as exc:
            log.warning("start-up work skipped: %s", exc)
            return
        self.entropy.prepare_boot_id()  # also a template's, for its clones' ReseedRandomDev
        if not guest.has_seccomp():
            return
        cache = self.containers.seccomp
        began = time.monotonic()
        log.info("seccomp: compiling containerd's default profile ahead")
        try:
            self._make_dirs()
            await warmup.warm_up(self.containers.crun, self.settings, self.entropy.container_mounts(),
                                 container_id=PRECOMPILE_ID, seccomp=seccompdefault.CONTAINERD_1_6_RUNTIME_DEFAULT,
                                 created=lambda config, state: cache.remember(seccompcache.profile_key(config), state),
                                 nice=19)
        except (OSError, PykataError) as exc:
            log.warning("seccomp: containerd's default profile not compiled ahead: %s", exc)
            return
        log.info("seccomp: containerd's default profile compiled ahead in %.0f ms (%d kept)",
                 1000 * (time.monotonic() - began), len(cache))

    # -- networking (pykata.agent.network: rtnetlink, agent/rtnl.py) -------------------------------

    async def UpdateInterface(self, req: agent_pb2.UpdateInterfaceRequest, ctx: Any) -> agent_pb2.Interface:
        return await network.update_interface(req.interface)

    async def UpdateRoutes(self, req: agent_pb2.UpdateRoutesRequest, ctx: Any) -> agent_pb2.Routes:
        return await network.update_routes(req.routes.routes)

    async def ListInterfaces(self, req: agent_pb2.ListInterfacesRequest, ctx: Any) -> agent_pb2.Interfaces:
        return await network.list_interfaces()

    async def ListRoutes(self, req: agent_pb2.ListRoutesRequest, ctx: Any) -> agent_pb2.Routes:
        return await network.list_routes()
