"""Containers in the guest: bundle, crun lifecycle, init and exec processes, storages, cgroup."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pykata.agent import bundle, diskfile, nsexec, seccompcache
from pykata.agent.crun import CREATE_TIMEOUT, Crun, CrunError, Stdio
from pykata.agent.processes import Process
from pykata.agent.reaper import Reaper
from pykata.agent.settings import AgentSettings
from pykata.agent.spawner import Spawner
from pykata.agent.stats import Cgroup, OOMWatcher
from pykata.agent.stdio import console_listener, receive_console
from pykata.agent.storage import Mounted, Storages
from pykata.agent.validation import check_count, check_exec_id, check_id
from pykata.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PykataError,
    ResourceExhausted,
    Unimplemented,
)
from pykata.protocols.agent import agent_pb2

log = logging.getLogger("pykata.agent.containers")

CONSOLE_TIMEOUT = 10.0
FREEZE_TIMEOUT = 5.0
MAX_CONTAINERS = 1024
MAX_EXECS = 1024  # per container: running ones plus exited ones the host may still ask about


class Container:
    """One container: status is "created", "running", "paused" or "stopped"."""

    def __init__(self, cid: str, bundle_dir: Path, spec: dict[str, Any], cgroup: Cgroup,
                 init: Process, mounts: list[Mounted]) -> None:
        self.id = cid
        self.bundle = bundle_dir
        self.spec = spec
        self.cgroup = cgroup
        self.init = init
        self.execs: dict[str, Process] = {}
        self.mounts = mounts
        self.status = "created"
        self.lock = asyncio.Lock()

    @property
    def rootfs(self) -> Path:
        return Path(self.spec["root"]["path"])

    def process(self, exec_id: str) -> Process:
        """Raises NotFound for an unknown exec id."""
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"container {self.id} has no process {exec_id!r}")
        return proc

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]

    def prune(self, *, keep: int) -> None:
        """Forget exec processes the host is done with (containerd has no "delete exec" call
        here, so without this a long-lived container with periodic execs grows without end).
        When more than `keep` remain, exited and waited ones go even with unread output."""
        for eid, proc in list(self.execs.items()):
            if proc.finished:
                proc.close()
                del self.execs[eid]
        for eid, proc in list(self.execs.items()):
            if len(self.execs) < keep:
                break
            if proc.exit_status is not None and proc.waited:
                proc.close()
                del self.execs[eid]


class Containers:
    """All containers of the agent, by id."""

    def __init__(self, settings: AgentSettings, reaper: Reaper, crun: Crun, storages: Storages,
                 oom: OOMWatcher, *, spawner: Spawner | None = None) -> None:
        self.settings = settings
        self.spawner = spawner
        # the image's exec starter, where it has one (else the agent forks the exec child)
        self.execstart = settings.native_exec and settings.exec_start and nsexec.execstart_available()
        self.reaper = reaper
        self.crun = crun
        self.storages = storages
        self.oom = oom
        self._items: dict[str, Container] = {}
        self._busy: set[str] = set()
        self._seq = itertools.count()
        self.seccomp = seccompcache.SeccompCache()

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        return list(self._items)

    def process_count(self) -> int:
        """Processes of every container (init and execs) the agent still keeps."""
        return sum(len(c.execs) + 1 for c in self._items.values())

    def get(self, cid: str, field: str = "container_id") -> Container:
        """Raises InvalidArgument for a malformed id, NotFound for an unknown one."""
        check_id(field, cid)
        c = self._items.get(cid)
        if c is None:
            raise NotFound(f"no container {cid!r}")
        return c

    def pid_ns_path(self, cid: str) -> str:
        """The pid namespace of container `cid`'s init, for another container to join (the pod's
        pause, CRI pid=POD). Raises InvalidArgument, NotFound, FailedPrecondition when its init ended."""
        c = self._items.get(check_id("pid_ns_container", cid))
        if c is None:
            raise NotFound(f"pid_ns_container: no container {cid!r}")
        if not c.init.running or c.status == "stopped":
            raise FailedPrecondition(f"pid_ns_container: container {cid} has no live init to share the pid "
                                     "namespace of")
        return f"/proc/{c.init.pid}/ns/pid"

    # -- create / start ------------------------------------------------------------------------

    async def create(self, req: agent_pb2.CreateContainerRequest, *, pid_ns_path: str | None = None,
                     extra_mounts: Sequence[dict[str, Any]] = ()) -> Container:
        """Mount the storages, write the bundle and `crun create` (the init process waits for
        StartContainer). Everything done is undone when a step fails.

        Raises InvalidArgument, AlreadyExists, ResourceExhausted or CrunError.
        """
        cid = check_id("container_id", req.container_id)
        if cid in self._items or cid in self._busy or self.crun.exists(cid):
            raise AlreadyExists(f"container {cid!r} already exists")
        if len(self._items) + len(self._busy) >= MAX_CONTAINERS:
            raise ResourceExhausted(f"the sandbox already has {MAX_CONTAINERS} containers")
        spec = bundle.load_spec(req.oci_spec_json)
        check_count("storages", req.storages)
        check_count("devices", req.devices)
        self._busy.add(cid)
        began = time.monotonic()
        try:
            async with contextlib.AsyncExitStack() as undo:
                mounts: list[Mounted] = []
                undo.callback(self._remove_storage_dir, cid)
                undo.callback(self._unmount, mounts)
                # in one thread hop for all of them (each hop is a few ms under TCG); if this RPC is
                # cancelled meanwhile, the thread's mounts finish first so that the undo sees them all
                mounting = asyncio.ensure_future(asyncio.to_thread(self._mount_all, req.storages, mounts))
                try:
                    await asyncio.shield(mounting)
                except asyncio.CancelledError:
                    await asyncio.wait({mounting})
                    raise
                mounted = time.monotonic()
                config = bundle.rewrite_spec(
                    spec, roots=self.settings.source_roots, cgroups_path=self.settings.cgroups_path(cid),
                    terminal=req.terminal, pid_ns_path=pid_ns_path, extra_mounts=extra_mounts,
                    devices=bundle.device_entries(req.devices), owned=True)
                seccomp_key = seccompcache.profile_key(config)
                compiled = self.seccomp.apply(seccomp_key, config)  # after rewrite_spec refused the host's run.oci.*
                bundle_dir = self.settings.bundles / cid
                shutil.rmtree(bundle_dir, ignore_errors=True)
                bundle_dir.mkdir(mode=0o700)
                undo.callback(shutil.rmtree, bundle_dir, True)
                (bundle_dir / "config.json").write_text(json.dumps(config))
                written = time.monotonic()
                init = Process(cid, "", tty=bool(config["process"].get("terminal")),
                               buffer_limit=self.settings.buffer_limit)
                undo.callback(init.close)
                undo.push_async_callback(self._crun_delete, cid)
                pid = await self._launch(init, cid, bundle_dir / "init.pid", lambda stdio, sock: self.crun.create(
                    cid, bundle_dir, bundle_dir / "init.pid", stdio, sock))
                if not compiled:
                    self.seccomp.remember(seccomp_key, self.crun.root / cid)
                container = Container(cid, bundle_dir, config, Cgroup.at(
                    self.settings.cgroups_path(cid), self.settings.cgroup_root), init, mounts)
                undo.pop_all()
        finally:
            self._busy.discard(cid)
        self._items[cid] = container
        self.oom.watch(cid, container.cgroup)
        assert init._exit is not None
        init._exit.add_done_callback(lambda _f: self._init_exited(container))
        # where the time went, for bench/pool_warmup.py and anyone reading the guest's console
        log.info("created container %s (pid %d) in %.0f ms: %d storages %.0f, bundle %.0f, crun create %.0f%s",
                 cid, pid, 1000 * (time.monotonic() - began), len(req.storages), 1000 * (mounted - began),
                 1000 * (written - mounted), 1000 * (time.monotonic() - written),
                 "" if seccomp_key is None else f" (seccomp {'kept' if compiled else 'compiled'} {seccomp_key[:12]})")
        return container

    async def _launch(self, proc: Process, cid: str, pid_file: Path,
                      run: Callable[[Stdio, str | None], Awaitable[None]]) -> int:
        """Run crun create/exec for `proc`: wire its stdio (pipes, or a console socket for a
        tty), wait for crun, read the pid file and start watching the pid."""
        generation = self.reaper.generation
        sock = None
        sock_path = ""
        try:
            if proc.tty:
                sock_path = str(self.settings.socket_dir / f"{next(self._seq)}.sock")
                sock = console_listener(sock_path)
                stdio = Stdio()
            else:
                stdin, stdout, stderr = proc.child_stdio()
                stdio = Stdio(stdin, stdout, stderr)
            try:
                await run(stdio, sock_path or None)
            finally:
                proc.close_child_stdio()
            if sock is not None:
                try:
                    async with asyncio.timeout(CONSOLE_TIMEOUT):
                        master = await receive_console(sock)
                except (TimeoutError, OSError) as exc:
                    raise Internal(f"no terminal from crun for {proc.name}: {exc}") from None
                proc.attach_console(master)
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError) as exc:
                raise Internal(f"crun left no usable pid file for {proc.name}: {exc}") from None
            proc.started(pid, self.reaper.watch(pid, since=generation))
            return pid
        finally:
            if sock is not None:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(sock_path)

    def _init_exited(self, container: Container) -> None:
        container.status = "stopped"
        status = container.init.exit_status
        log.info("container %s: init exited with %s", container.id, status.code if status else "?")
        with contextlib.suppress(Exception):
            self.oom.check(container.id)

    async def start(self, cid: str) -> int:
        """Raises FailedPrecondition unless the container is created and not yet started."""
        c = self.get(cid)
        async with c.lock:
            if c.status != "created" or not c.init.running:
                raise FailedPrecondition(f"container {cid} is {c.status}, not created")
            await self.crun.start(cid)
            c.status = "running"
            return c.init.pid

    # -- exec and signals ----------------------------------------------------------------------

    async def exec(self, cid: str, exec_id: str, process: agent_pb2.Process) -> int:
        """Start an extra process in a running container. Raises PykataError (CrunError among them)."""
        c = self.get(cid)
        eid = check_exec_id("exec_id", exec_id, allow_empty=False)
        async with c.lock:
            c.prune(keep=MAX_EXECS)
            if eid in c.execs:
                raise AlreadyExists(f"container {cid} already has a process {eid!r}")
            if c.status != "running":
                raise FailedPrecondition(f"container {cid} is {c.status}, not running")
            if len(c.execs) >= MAX_EXECS:
                raise ResourceExhausted(f"container {cid} has {MAX_EXECS} processes; "
                                                        "remove some")
            doc = bundle.process_from_proto(process, c.spec["process"], c.rootfs)
            proc = Process(cid, eid, tty=process.terminal, buffer_limit=self.settings.buffer_limit)
            plan = nsexec.plan(c.spec, doc, init_pid=c.init.pid, cgroup_dir=c.cgroup.dir(""),
                               cgroup_version=c.cgroup.version, crun_state=self.crun.root / cid) \
                if self.settings.native_exec else None
            if plan is not None:
                try:
                    pid = await self._launch_native(proc, cid, plan)
                except BaseException:
                    proc.close()
                    raise
                c.execs[eid] = proc
                return pid
            spec_file = c.bundle / f"exec-{eid}.json"
            pid_file = c.bundle / f"exec-{eid}.pid"
            spec_file.write_text(json.dumps(doc))
            try:
                pid = await self._launch(proc, cid, pid_file, lambda stdio, sock: self.crun.exec(
                    cid, spec_file, pid_file, stdio, sock))
            except BaseException:
                proc.close()
                raise
            finally:
                with contextlib.suppress(OSError):
                    spec_file.unlink()
            c.execs[eid] = proc
            return pid

    async def disk_file(self, req: agent_pb2.DiskFileRequest, *, write: bool) -> agent_pb2.DiskFileResponse:
        """WriteFileFromDisk (`write`) or ReadFileToDisk: a copy between the data disk and a file, done
        by a child that is the container's process `req.process` (pykata.agent.diskfile). Raises
        Unimplemented where nsexec cannot act as that process (crun would be needed), PykataError."""
        c = self.get(req.container_id)
        if not req.path or "\0" in req.path:
            raise InvalidArgument("path", "must be a non-empty path without NUL")
        if c.status != "running":
            raise FailedPrecondition(f"container {c.id} is {c.status}, not running")
        doc = bundle.process_from_proto(req.process, c.spec["process"], c.rootfs)
        doc["args"] = ["true"]  # never run: the plan's checks want a program
        plan = nsexec.plan(c.spec, doc, init_pid=c.init.pid, cgroup_dir=c.cgroup.dir(""),
                           cgroup_version=c.cgroup.version, crun_state=self.crun.root / c.id) \
            if self.settings.native_exec else None
        if plan is None:
            raise Unimplemented("this container's processes are started by crun; the host streams the file")
        device = await asyncio.to_thread(diskfile.find_disk, req.disk)
        try:
            copied, size, mode, uid, gid = await diskfile.run(
                plan, self.reaper, device, write=write, path=req.path, offset=req.offset, length=req.length,
                create=req.create, mode=req.mode if req.HasField("mode") else None,
                uid=req.uid if req.HasField("uid") else None, gid=req.gid if req.HasField("gid") else None)
        except ProcessLookupError:
            raise FailedPrecondition(f"container {c.id} is not running") from None
        except TimeoutError:
            raise DeadlineExceeded(f"copying {req.path!r} took too long") from None
        except nsexec.ActionFailed as exc:
            raise nsexec.ActionFailed(f"{req.path}: {exc}", exc.errno) from None
        except OSError as exc:
            raise Internal(f"data disk: {exc.strerror or exc}") from None
        return agent_pb2.DiskFileResponse(length=copied, file_size=size, mode=mode, uid=uid, gid=gid)

    async def _launch_native(self, proc: Process, cid: str, plan: nsexec.ExecPlan) -> int:
        """Start an exec process with nsexec (what `crun exec --detach` would do, without crun)."""
        stdin, stdout, stderr = proc.child_stdio()
        try:
            pid, exited = await nsexec.spawn(plan, self.reaper, stdin=stdin, stdout=stdout, stderr=stderr,
                                             timeout=CREATE_TIMEOUT, spawner=self.spawner,
                                             execstart=self.execstart)
        except ProcessLookupError:
            raise FailedPrecondition(f"container {cid} is not running") from None
        except nsexec.ExecFailed as exc:
            raise nsexec.ExecFailed(f"exec in container {cid}: {exc}", exc.missing) from None
        except TimeoutError:
            raise DeadlineExceeded(f"exec in container {cid} did not start within {CREATE_TIMEOUT}s") from None
        except OSError as exc:
            raise Internal(f"exec in container {cid}: {exc}") from None
        finally:
            proc.close_child_stdio()
        proc.started(pid, exited)
        log.debug("exec %s: pid %d, started without crun", proc.name, pid)
        return pid

    async def signal(self, cid: str, exec_id: str, signum: int, all_processes: bool) -> None:
        c = self.get(cid)
        check_exec_id("exec_id", exec_id)
        if not 0 < signum < signal.NSIG:
            raise InvalidArgument("signal", f"{signum} is not a signal number")
        if all_processes and not exec_id:
            if not any(p.running for p in c.processes()):
                raise NotFound(f"container {cid} has no running process")
            if c.status == "created":
                c.init.signal(signum)
                return
            await self.crun.kill(cid, signum, all_processes=True)
            return
        c.process(exec_id).signal(signum)

    # -- resources -----------------------------------------------------------------------------

    async def update(self, cid: str, resources_json: str) -> None:
        c = self.get(cid)
        resources = bundle.load_resources(resources_json)
        async with c.lock:
            if c.status == "stopped":
                raise FailedPrecondition(f"container {cid} is stopped")
            path = c.bundle / f"resources-{next(self._seq)}.json"
            path.write_text(json.dumps(resources))
            try:
                await self.crun.update(cid, path)
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()

    async def pause(self, cid: str) -> None:
        c = self.get(cid)
        async with c.lock:
            if c.status != "running":
                raise FailedPrecondition(f"container {cid} is {c.status}, not running")
            await self.crun.pause(cid)
            c.status = "paused"
            # crun may return while a v1 freezer still says FREEZING (a task was mid-fork); the
            # RPC promises a stopped container, so wait for FROZEN.
            for _ in range(int(FREEZE_TIMEOUT / 0.02)):
                state = c.cgroup.freezer_state()
                if state in ("frozen", ""):
                    break
                c.cgroup.refreeze()
                await asyncio.sleep(0.02)
            else:
                raise DeadlineExceeded(f"container {cid} did not freeze within {FREEZE_TIMEOUT}s")

    async def resume(self, cid: str) -> None:
        c = self.get(cid)
        async with c.lock:
            if c.status != "paused":
                raise FailedPrecondition(f"container {cid} is {c.status}, not paused")
            await self.crun.resume(cid)
            c.status = "stopped" if not c.init.running else "running"

    # -- removal -------------------------------------------------------------------------------

    async def remove(self, cid: str, timeout: float | None) -> None:
        """Kill every process of the container, wait for them (up to `timeout` seconds, None =
        for ever), `crun delete`, and release stdio, bundle, storages and cgroup.

        Raises DeadlineExceeded when processes outlive the timeout (the container
        stays, so the call can be repeated).
        """
        c = self.get(cid)
        async with c.lock:
            if c.status == "paused":
                with contextlib.suppress(CrunError):
                    await self.crun.resume(cid)
                c.status = "running" if c.init.running else "stopped"
            if any(p.running for p in c.processes()):
                with contextlib.suppress(CrunError):
                    await self.crun.kill(cid, signal.SIGKILL, all_processes=True)
                for p in c.processes():
                    if p.running:
                        with contextlib.suppress(ProcessLookupError, PykataError):
                            p.signal(signal.SIGKILL)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(p.wait() for p in c.processes() if p.has_started))
            except TimeoutError:
                raise DeadlineExceeded(f"processes of container {cid} still run after {timeout}s") from None
            self.oom.unwatch(cid)
            await self._crun_delete(cid)
            for p in c.processes():
                p.close()
            if c.cgroup.exists():
                for pid in c.cgroup.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    c.cgroup.remove()
            shutil.rmtree(c.bundle, ignore_errors=True)
            self._unmount(c.mounts)
            self._remove_storage_dir(cid)
            del self._items[cid]
            c.status = "deleted"
            log.info("removed container %s", cid)

    async def remove_all(self, timeout: float | None) -> list[str]:
        """Remove every container; returns the errors (teardown continues past them)."""
        errors = []
        for cid in list(self._items):
            try:
                await self.remove(cid, timeout)
            except Exception as exc:
                errors.append(f"{cid}: {exc}")
        return errors

    async def _crun_delete(self, cid: str) -> None:
        if not self.crun.exists(cid):
            return
        try:
            await self.crun.delete(cid, force=True)
        except CrunError as exc:
            if self.crun.exists(cid):
                raise
            log.debug("crun delete %s: %s", cid, exc)

    def _mount_all(self, storages: Sequence[agent_pb2.Storage], mounts: list[Mounted]) -> None:
        """Mount `storages` in order, appending each to `mounts` as it is made (so a failure part-way
        leaves in `mounts` what the caller must undo). Raises what Storages.mount raises."""
        for i, storage in enumerate(storages):
            mounts.append(self.storages.mount(storage, f"storages[{i}]"))

    def _unmount(self, mounts: list[Mounted]) -> None:
        for err in self.storages.unmount(mounts):
            log.warning("%s", err)

    def _remove_storage_dir(self, cid: str) -> None:
        """Remove <state>/storage/<cid> and the empty directories below it once its storages are
        unmounted: Storages.unmount removes only the mount points, not the parents it made for them
        (nor the mount point of a storage whose mount failed), and a long-lived pod that runs many
        containers kept one empty directory per removed container. Only empty directories go, the
        walk stops at mount points (one that failed to unmount keeps its contents and parents) and
        follows no symlink."""
        base = self.settings.storage_dir / cid
        try:
            dev = os.lstat(base).st_dev
        except OSError:
            return
        found: list[str] = []
        for parent, dirs, _files in os.walk(base, followlinks=False):
            dirs[:] = [d for d in dirs if self._same_mount(os.path.join(parent, d), dev)]
            found.extend(os.path.join(parent, d) for d in dirs)
        for d in reversed(found):  # children before their parents
            with contextlib.suppress(OSError):
                os.rmdir(d)
        with contextlib.suppress(OSError):
            os.rmdir(base)

    @staticmethod
    def _same_mount(path: str, dev: int) -> bool:
        """Whether `path` is a directory (not a symlink) on device `dev` and no mount point."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_dev == dev and not os.path.ismount(path)
