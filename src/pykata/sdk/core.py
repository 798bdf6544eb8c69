"""AsyncSandbox: one disposable VM sandbox for asyncio code (the blocking `Sandbox` wraps it).

Each sandbox is one VM running the image's container with a long-lived idle process; commands run in
that container (`run`, `spawn`, `pty`), files are read and written in it (`files`). Leaving the
`async with` block, `close()`, or the sandbox's `timeout` destroys the VM and everything it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import shlex
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pykata.config import Config, load_config, with_shared_fs
from pykata.errors import AgentError, HypervisorError, InvalidArgument, PykataError
from pykata.ids import HOSTNAME_RULE, USER_ID_RULE, is_hostname, is_user_id
from pykata.images import ImageStore
from pykata.network import EgressPolicy
from pykata.resources import sizing
from pykata.sandbox import Process, Sandbox, Volume, build_spec, lookup
from pykata.sandbox.datadisk import DiskSession
from pykata.sandbox.imageuser import ExecUser, check_user_text, container_user, resolve_user
from pykata.sandbox.ocispec import SpecError, check_cwd
from pykata.sandbox.process import exec_spec
from pykata.sandbox.remote import AttachedSandbox
from pykata.sandbox.snapshot import warm_up as snapshot_warm_up
from pykata.sandbox.state import list_sandboxes
from pykata.sandbox.state import load as load_state
from pykata.sdk import snapshot as sdk_snapshot
from pykata.sdk.errors import NotFoundError, PolicyDeniedError, SandboxGoneError, SandboxTimeoutError, SdkError
from pykata.sdk.files import AsyncFiles
from pykata.sdk.process import AsyncProcess, ExecResult
from pykata.timing import mark
from pykata.ttrpc import Code

IDLE_COMMAND = ("sleep", "2147483647")
# What `prepare_command` starts: a shell that reads one line (busybox's `read` takes a pipe byte by
# byte, so what follows the line stays the command's stdin) and runs it: `exec <the command>`.
PREPARED_COMMAND = ("/bin/sh", "-c", 'IFS= read -r line && eval "$line"')
MAX_OUTPUT = 256 << 20  # what run() collects at most (the guest decides how much it prints)
PREPARED_STDIN_WITH_LINE = 4096  # input sent with the prepared shell's command line (an empty pipe takes it)
RUN_OUTPUT_LIMIT = 1 << 20  # output asked for with each wait of run() (the agent's cap per stream)
KILLED_OUTPUT_GRACE = 5.0  # how long a timed-out run waits for the killed command's output
SDK_STATE = "sdk.json"  # what connect() needs to run commands as the creator did

Command = str | Sequence[str]
Network = Literal["none", "egress"]
# how the sandbox's volumes reach its guest: "virtio-fs" boots the VM cold, with runc's semantics for
# the volumes but O_TMPFILE; "virtio-9p" (what a templated VM has) clones the template
SharedFsChoice = Literal["virtio-fs", "virtio-9p"]
SHARED_FS_CHOICES: tuple[SharedFsChoice, ...] = ("virtio-fs", "virtio-9p")
Env = Mapping[str, str] | Sequence[str]
User = int | str | tuple[int, int]


@dataclass(frozen=True)
class Metrics:
    """What the sandbox's container used, read from its cgroup in the guest."""

    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    # None: no limit on the container's cgroup (memory.max "max", as docker's stats and cgroup v2 say it);
    # the VM's own memory still bounds it
    memory_limit_bytes: int | None
    pids: int
    disk_used_bytes: int  # what the container wrote to its root (its writable layer, in guest memory)
    disk_size_bytes: int  # the writable layer's size (`disk_mib`)


@dataclass(frozen=True)
class SandboxInfo:
    """A running sandbox on this host, as `AsyncSandbox.list()` reports it."""

    id: str
    name: str
    image: str
    created_at: float
    owner_pid: int


def _egress_policy(network: Network | None, allow: Sequence[str] | None, deny: Sequence[str],
                   dns: Sequence[str]) -> EgressPolicy | None:
    if network not in (None, "none", "egress"):
        raise SpecError("network", f"{network!r}: use None (no NIC, the default) or \"egress\"")
    if network != "egress":
        for value, field in ((allow, "allow"), (deny, "deny"), (dns, "dns")):
            if value:
                raise SpecError(field, "needs network=\"egress\" (a sandbox has no network by default)")
        return None
    try:
        return EgressPolicy.build(allow=allow, deny=deny, dns=dns)
    except InvalidArgument as e:
        raise SpecError(e.field, str(e).removeprefix(f"{e.field}: ")) from None




def _free_port(host: str) -> int:
    """A port nothing listens on now (QEMU binds it a moment later; a race is retried)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _argv(cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        if not cmd.strip():
            raise SpecError("cmd", "empty command")
        return ["/bin/sh", "-c", cmd]
    # run(123) was "TypeError: 'int' object is not iterable"; bytes would have run its numbers
    if not isinstance(cmd, Sequence) or isinstance(cmd, (bytes, bytearray)):
        raise SpecError("cmd", f"{type(cmd).__name__} is not a command: give a str (run by /bin/sh -c) or a "
                               "list of arguments")
    argv = [str(a) for a in cmd]
    if not argv:
        raise SpecError("cmd", "empty command")
    return argv


def _env_list(env: Env | None) -> list[str]:
    if env is None:
        return []
    items = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
    for item in items:
        if "=" not in item or item.startswith("=") or "\0" in item:
            raise SpecError("env", f"{item!r} is not KEY=VALUE")
    return items


def _user_text(user: User | None) -> str | None:
    """The SDK's `user` as docker's -u text (USER[:GROUP]: names or numbers), checked as far as it can
    be before the image is known. Raises SpecError naming `user`."""
    if user is None:
        return None
    parts = user if isinstance(user, tuple) else (user,)
    if isinstance(user, tuple) and len(user) != 2:
        raise SpecError("user", f"{user!r}: give (uid, gid)")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise SpecError("user", f"{type(part).__name__} is not a user: give a uid, a name, \"USER:GROUP\" "
                                    "or (uid, gid)")
        if isinstance(part, int) and not is_user_id(part):
            raise SpecError("user", f"{part} is not {USER_ID_RULE}")
    return check_user_text(":".join(str(p) for p in parts), "user")


class AsyncSandbox:
    """One VM sandbox for asyncio code. Use `async with`, or `await start()` / `await close()`.

    `timeout`: seconds after start when the sandbox is destroyed (None: until closed); `set_timeout`
    moves the deadline. `env`, `cwd`, `user` are the defaults of every command; without `user`, commands
    (and the container's init) run as the image's USER, as docker's (a name, "USER:GROUP", a uid or
    (uid, gid), looked up in the image as docker's -u).
    """

    def __init__(self, image: str = "busybox", *, cpus: int | None = None, memory_mib: int | None = None,
                 disk_mib: int | None = None, env: Env | None = None, volumes: Sequence[str] = (),
                 config: Config | None = None, timeout: float | None = None, cwd: str | None = None,
                 user: User | None = None, name: str = "", idle_command: Sequence[str] = IDLE_COMMAND,
                 snapshots: bool = False, network: Network | None = None, allow: Sequence[str] | None = None,
                 deny: Sequence[str] = (), dns: Sequence[str] = (), shared_fs: SharedFsChoice | None = None) -> None:
        self.image_ref = image
        if shared_fs is not None and shared_fs not in SHARED_FS_CHOICES:
            raise SpecError("shared_fs", f"{shared_fs!r} is not one of {', '.join(SHARED_FS_CHOICES)}")
        if shared_fs is not None and snapshots:
            raise SpecError("shared_fs", "a sandbox made for snapshots shares no directory with its guest")
        self.shared_fs = shared_fs
        self.cpus = cpus
        self.memory_mib = memory_mib
        if disk_mib is not None and (not isinstance(disk_mib, int) or disk_mib <= 0):
            raise SpecError("disk_mib", f"{disk_mib!r} must be a positive number of MiB")
        self.disk_mib = disk_mib
        self._disk_bytes: int | None = None  # the writable layer's size, once this object made the sandbox
        self.egress = _egress_policy(network, allow, deny, dns)
        self._exposed: dict[int, int] = {}  # guest port -> host port
        self.volumes = list(volumes)
        self.config = config
        if name and not is_hostname(name):  # the guest's host name too (checked again by its agent)
            raise SpecError("name", f"{name[:80]!r} is not a host name ({HOSTNAME_RULE})")
        self.name = name
        self.idle_command = list(idle_command)
        # A sandbox that can be snapshotted shares no host directory with its guest (sdk/snapshot.py).
        self.snapshots = snapshots
        self.files = AsyncFiles(self)
        self._extra_env = _env_list(env)
        self._user_arg = _user_text(user)
        # who commands run as: the `user` given, else the image's USER, else root (resolved at start, in
        # the image, as `pykata run -u` and docker's -u are)
        self._user: ExecUser | None = None
        self._rootfs: Path | None = None  # the image's root (names of a command's `user` are looked up there)
        self._cwd_arg = check_cwd(cwd)
        self._timeout = timeout
        self._env: list[str] = []
        self._cwd = "/"
        self._sandbox: Sandbox | None = None
        self._container: Any = None
        self._processes: list[AsyncProcess] = []
        self._prepared: Process | None = None  # prepare_command's waiting shell
        self._gone: str | None = None  # why nothing can run any more
        self._paused = False
        self._owned = True  # False for a sandbox reached with connect(): close() only disconnects
        self._attached: AttachedSandbox | None = None
        self._found: lookup.Found | None = None
        self._id = ""
        self._warm: asyncio.Future[None] | None = None
        self._cid = ""  # the container's id: the sandbox's, or the saved one's after a restore
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self.deadline: float | None = None  # time.time() when the sandbox is destroyed

    @property
    def id(self) -> str:
        return self._sandbox.id if self._sandbox else self._id

    @property
    def cwd(self) -> str:
        """The working directory of commands and of relative file paths."""
        return self._cwd

    @property
    def env(self) -> list[str]:
        return list(self._env)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> AsyncSandbox:
        """Boot the VM and start the container. Raises PykataError (ImageError, SandboxError, ...); a
        cancelled start (KeyboardInterrupt in the blocking API) leaves nothing behind."""
        if self._sandbox is not None:
            return self
        if self._timeout is not None and self._timeout <= 0:
            raise SpecError("timeout", f"{self._timeout} must be positive")
        config = self.config or load_config()
        if self.shared_fs is not None:
            # virtio-fs boots the VM cold (a template carries only 9p): see README, Host volumes
            config = with_shared_fs(config, self.shared_fs)
        image = ImageStore(Path(config.runtime.cache_dir), config.image).resolve(self.image_ref)
        mark("sdk.image")
        vols = [Volume.parse(v, f"volumes[{i}]") for i, v in enumerate(self.volumes)]
        self._env = [*image.config.env, *self._extra_env]
        self._cwd = self._cwd_arg or image.config.working_dir or "/"
        self._rootfs = image.rootfs
        self._user = container_user(image.rootfs, self._user_arg, image.config.user, "user")
        spec = build_spec(self.idle_command, env=self._env, cwd=self._cwd, user=(self._user.uid, self._user.gid),
                          groups=self._user.groups)
        config, vcpus, memory_mib = sizing.fit(config, sizing.vm_size(
            self.cpus, self.memory_mib, vcpus_source="cpus", memory_source="memory_mib"))
        if self.snapshots and vols:
            raise SpecError("volumes", "a sandbox made for snapshots cannot have volumes (they are host "
                                       "directories shared with the guest)")
        # the writable layer is a tmpfs in guest memory: it can never hold more than the VM has. Its size
        # is always given (half the VM's memory by default, as tmpfs's own default), so metrics() knows it
        vm_mib = memory_mib or config.qemu.default_memory
        if self.disk_mib is not None and self.disk_mib > vm_mib:
            raise SpecError("disk_mib", f"{self.disk_mib} MiB is more than the sandbox's memory ({vm_mib} MiB): "
                            "the writable layer lives in guest memory; raise memory_mib")
        self._disk_bytes = (self.disk_mib or config.runtime.rootfs_upper_size or max(vm_mib // 2, 1)) << 20
        config = dataclasses.replace(config, runtime=dataclasses.replace(
            config.runtime, rootfs_upper_size=self._disk_bytes >> 20))
        self._sandbox = await Sandbox.create(config=config, vcpus=vcpus, memory_mib=memory_mib, name=self.name,
                                             guest_share=not self.snapshots, egress=self.egress,
                                             die_with_owner=True)
        self._cid = self._sandbox.id
        if self.snapshots:
            # the hashes a snapshot's manifest needs, computed while the container starts
            self._warm = asyncio.ensure_future(snapshot_warm_up(self._sandbox.config))
        try:
            async with self._denials():
                self._container = await self._sandbox.create_container(
                    self._sandbox.id, spec, image.rootfs, volumes=vols, image=self.image_ref)
                mark("sdk.container.created")
                await self._container.start()
                mark("sdk.container.started")
            await self._container.init.close_stdin()
            if self.egress is not None and self.egress.dns:
                # written as root whatever the image's USER (docker writes a container's resolv.conf itself)
                who, self._user = self._user, ExecUser(0, 0, (0,))
                try:
                    await self.files.write("/etc/resolv.conf", "".join(f"nameserver {r}\n" for r in self.egress.dns))
                finally:
                    self._user = who
            self._write_sdk_state()
        except BaseException:
            await self._destroy("start failed")
            raise
        if self._timeout is not None:
            await self.set_timeout(self._timeout)
        mark("sdk.ready")
        return self

    def _write_sdk_state(self) -> None:
        assert self._sandbox is not None
        (self._sandbox.dir / SDK_STATE).write_text(json.dumps(
            {"env": self._env, "cwd": self._cwd, "user": self._user.to_list() if self._user else None}))

    async def snapshot(self, path: str | os.PathLike[str], *, close: bool = False) -> Path:
        """Save the sandbox to the new directory `path` (its memory, processes and files; see
        pykata.sdk.snapshot), pausing it meanwhile; then it runs on (or is closed with `close=True`).
        A sandbox made with `snapshots=True` can always be saved; another only while its guest never
        mounted the host's share (no volumes, its root on an image disk). Returns the snapshot's path.
        Raises SnapshotError (naming what is wrong), SandboxGoneError, PolicyDeniedError (not the owner)."""
        saved: Path = await sdk_snapshot.snapshot(self, Path(path), close=close)
        return saved

    @classmethod
    async def restore(cls, path: str | os.PathLike[str], *, config: Config | None = None,
                      timeout: float | None = None, name: str = "") -> AsyncSandbox:
        """A new running sandbox from the snapshot at `path` (made by `snapshot`, in any process): a
        new id and VM, its own randomness and boot id. Raises SnapshotError naming the manifest field
        that does not match this host or is malformed; nothing is left behind on failure."""
        sb: AsyncSandbox = await sdk_snapshot.restore(cls, Path(path), config=config, timeout=timeout, name=name)
        return sb

    async def set_timeout(self, seconds: float | None) -> None:
        """Destroy the sandbox `seconds` from now (None: never). Raises SandboxGoneError."""
        self._check()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.deadline = None
        if seconds is None:
            return
        if seconds <= 0:
            raise SpecError("timeout", f"{seconds} must be positive")
        loop = asyncio.get_running_loop()
        self.deadline = time.time() + seconds
        self._timer = loop.call_later(seconds, self._expire, seconds)

    def _expire(self, seconds: float) -> None:
        self._timer = None
        if self._gone is None:
            self._gone = f"reached its timeout ({seconds:g}s) and was destroyed"
            self._closing = asyncio.ensure_future(self._destroy(self._gone))

    async def pause(self) -> None:
        """Stop the VM's vCPUs: it uses no CPU; memory and processes are kept. Commands raise
        PolicyDeniedError until `resume()`. Raises SandboxGoneError, SdkError."""
        self._check()
        sb = self._own("pause")
        await sb.pause_vm()
        self._paused = True

    async def resume(self) -> None:
        """Run a paused VM again. Raises SandboxGoneError, SdkError."""
        sb = self._own("resume")
        if self._gone is not None:
            raise SandboxGoneError(self._gone, sandbox_id=self.id)
        await sb.resume_vm()
        self._paused = False

    async def resize(self, *, memory_mib: int | None = None, cpus: int | None = None) -> tuple[int, int]:
        """Grow or shrink the running VM (None: unchanged); return its (memory MiB, vCPUs) now. Memory
        is the VM's as `memory_mib=` at creation (up to hypervisor.qemu.default_maxmemory), `cpus` up to
        default_maxvcpus; the guest's MemTotal and `nproc` follow. Raises SandboxGoneError, SdkError,
        HypervisorError (outside what the VM can have, or the guest did not follow in time)."""
        self._check()
        sb = self._own("resize")
        config, vcpus, memory = sizing.fit(sb.config, sizing.vm_size(
            cpus, memory_mib, vcpus_source="cpus", memory_source="memory_mib"))
        del config  # a running VM keeps its configuration; fit() only checks and caps
        return await sb.resize(memory_mib=memory, vcpus=vcpus)

    @property
    def paused(self) -> bool:
        return self._paused

    async def close(self) -> None:
        """Destroy the VM and everything it used (a connected sandbox is only disconnected). Idempotent.

        A close that is cancelled (Ctrl-C under asyncio.run cancels the main task) waits for the
        destruction before it re-raises; one whose loop is torn down mid-way (a second Ctrl-C) finishes
        synchronously (Sandbox.teardown_now): the VM's directory and mounts never outlive the call."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._destroy("was closed"))
        try:
            await asyncio.shield(self._closing)
        except asyncio.CancelledError:
            if not self._closing.done():
                await asyncio.wait([self._closing])  # cancelled again: _destroy's own fallback
            raise

    async def _destroy(self, why: str) -> None:
        try:
            await self._destroy_all(why)
        except BaseException:
            # cut short (this task cancelled as its loop ends, a KeyboardInterrupt raised in it, its
            # coroutine closed): the owned VM's host side goes now, without awaiting
            if self._sandbox is not None and self._owned:
                self._sandbox.teardown_now()
            raise

    async def _destroy_all(self, why: str) -> None:
        if self._gone is None:
            self._gone = why
        if self._warm is not None and not self._warm.done():
            self._warm.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for p in self._processes:
            await p.detach()
        self._processes.clear()
        if self._sandbox is not None and self._owned:
            await self._sandbox.stop()
        if self._attached is not None:
            await self._attached.close()

    def _own(self, what: str) -> Sandbox:
        if not self._owned:
            raise PolicyDeniedError(f"{what}: only its owner (the process that made it) can", sandbox_id=self.id)
        if self._sandbox is None:
            raise SdkError("the sandbox is not started")
        return self._sandbox

    def _check(self) -> None:
        if self._gone is not None:
            raise SandboxGoneError(self._gone, sandbox_id=self.id)
        if self._container is None:
            raise SdkError("the sandbox is not started (use `async with` or `await start()`)")
        if self._paused:
            raise PolicyDeniedError("the sandbox is paused: resume() it first", sandbox_id=self.id)

    async def _vm_ended_soon(self, grace: float = 2.0) -> bool:
        """Whether the VM ended, waiting a little for it: the agent's connection may drop a moment
        before the driver has seen QEMU exit."""
        vm = self._sandbox.vm if self._sandbox is not None else None
        if vm is not None and not vm.exited.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(vm.exited), grace)
        return self._vm_ended()

    def _vm_ended(self) -> bool:
        vm = self._sandbox.vm if self._sandbox is not None else None
        if vm is not None:
            return vm.exited.done()
        if self._found is None:
            return False
        record = load_state(self._found.dir)  # the owner's view now: stopped, or the owner died
        return record is None or not lookup.Found(self._found.dir, record).running

    async def metrics(self) -> Metrics:
        """CPU time, memory, processes and disk use of the sandbox's container. Raises SandboxGoneError,
        AgentError, SdkError."""
        sb = self._own("metrics")
        async with self._guard():
            s = await sb.stats_container(self._cid or sb.id)
        # statfs of the container's root in its own view (the overlay): its free blocks are the tmpfs upper
        # layer's, whose size this sandbox set; its total also counts the image's used blocks (as `df /`
        # shows them, guestimage/kernel.py), which are not the container's writes. The answer is the
        # guest's, so it is parsed strictly
        r = await self.run(["stat", "-f", "-c", "%S %b %f", "/"], max_output=256)
        try:
            block, blocks, free = (int(x) for x in r.stdout.split())
            if r.exit_code != 0 or block <= 0 or min(blocks, free) < 0 or free > blocks:
                raise ValueError
        except ValueError:
            raise SdkError(f"metrics: unexpected statfs answer {r.stdout[:80]!r}", sandbox_id=self.id) from None
        # (a sandbox this object only connected to: the overlay's own total)
        size = self._disk_bytes if self._disk_bytes is not None else blocks * block
        return Metrics(cpu_seconds=s.cpu.usage_total_ns / 1e9, memory_bytes=s.memory.usage,
                       memory_peak_bytes=s.memory.max_usage, memory_limit_bytes=s.memory.limit or None,
                       pids=s.pids.current, disk_used_bytes=max(size - free * block, 0), disk_size_bytes=size)

    async def expose(self, port: int, *, host_port: int = 0, host: str = "127.0.0.1") -> int:
        """Forward TCP `host:host_port` on the host to `port` in the sandbox (a sandbox made with
        network="egress"); `host_port` 0 picks a free one. Returns the host port. The forward ends with
        the sandbox. Raises SpecError (bad port, no egress network), PolicyDeniedError (not the owner),
        SdkError (the host port is taken)."""
        sb = self._own("expose")
        self._check()
        for value, field in ((port, "port"), (host_port, "host_port")):
            if not isinstance(value, int) or not 0 <= value <= 65535 or (field == "port" and value == 0):
                raise SpecError(field, f"{value!r} is not a TCP port")
        try:
            host_ip = str(ipaddress.IPv4Address(host))
        except ValueError:
            raise SpecError("host", f"{host!r} is not an IPv4 address of this host") from None
        if self.egress is None:
            raise SpecError("network", "expose() needs a sandbox made with network='egress'")
        if sb.config.qemu.user_network == "passt":
            raise SpecError("network", "expose() is not available with hypervisor.qemu.user_network = \"passt\" "
                                       "(Debian 12's passt forwards no port into the guest; configuration.toml)")
        for _ in range(3 if host_port == 0 else 1):
            chosen = host_port or _free_port(host_ip)
            try:
                await sb.forward_port(port, chosen, host_ip)
            except HypervisorError as e:
                last = e
                continue
            self._exposed[port] = chosen
            return chosen
        raise SdkError(f"expose {port}: cannot listen on {host_ip}:{host_port or 'a free port'}: {last}",
                       sandbox_id=self.id)

    @contextlib.asynccontextmanager
    async def _denials(self) -> AsyncIterator[None]:
        """An agent-policy refusal (PERMISSION_DENIED naming the rule) becomes PolicyDeniedError."""
        try:
            yield
        except AgentError as e:
            if getattr(e, "code", None) == Code.PERMISSION_DENIED:
                raise PolicyDeniedError(str(e), sandbox_id=self.id) from e
            raise

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Refuse calls on a closed or paused sandbox; an agent failure of a sandbox that is gone
        becomes SandboxGoneError."""
        self._check()
        try:
            yield
        except AgentError as e:
            if getattr(e, "code", None) == Code.PERMISSION_DENIED:
                # the agent policy (docs/policy.md) refused it; the message names the rule
                raise PolicyDeniedError(str(e), sandbox_id=self.id) from e
            connection_lost = getattr(e, "code", None) == Code.UNAVAILABLE
            if self._gone is None and (await self._vm_ended_soon() if connection_lost else self._vm_ended()):
                self._gone = "its VM ended"
            if self._gone is not None:
                raise SandboxGoneError(self._gone, sandbox_id=self.id) from e
            raise

    # -- commands ----------------------------------------------------------------------------------

    async def spawn(self, cmd: Command, *, env: Env | None = None, cwd: str | None = None,
                    user: User | None = None, stdin: bytes | str | bool = False,
                    terminal: bool = False) -> AsyncProcess:
        """Start `cmd` (a str runs with /bin/sh -c, a list as argv) in the background. `stdin`: False
        closes it at once, True keeps it open for `proc.stdin.write`, bytes/str are written then closed.
        Raises SpecError (bad argument, naming it), SandboxGoneError, AgentError."""
        if not isinstance(stdin, (bytes, str, bool)):
            raise SpecError("stdin", f"expected bytes, str or a bool, not {type(stdin).__name__}")
        data = None if stdin is True else b"" if stdin is False else stdin.encode() if isinstance(stdin, str) \
            else bytes(stdin)
        raw = await self._launch(_argv(cmd), env=env, cwd=cwd, user=user, stdin=data, terminal=terminal)
        proc = AsyncProcess(raw, _argv(cmd), self.id, self._guard)
        proc.stdin.closed = data is not None
        self._processes = [p for p in self._processes if p.running]
        self._processes.append(proc)
        return proc

    async def _launch(self, argv: list[str], *, env: Env | None, cwd: str | None, user: User | None,
                      stdin: bytes | None, terminal: bool = False) -> Process:
        """Start `argv`, write `stdin` and close it (None: keep it open): the prepared shell when it
        fits, else an exec that carries the input (one round trip for a short one)."""
        envs = [*self._env, *_env_list(env)]
        check_cwd(cwd)
        who = self._resolve_user(user)
        raw: Process | None = None
        if self._prepared is not None and env is None and cwd in (None, self._cwd) and user is None \
                and not terminal:
            # a short input goes with the command line (an empty pipe takes it whole: it cannot be
            # half-written when the command then exits, and so be mistaken for a shell that ended)
            head = stdin if stdin and len(stdin) <= PREPARED_STDIN_WITH_LINE else b""
            raw = await self._take_prepared(argv, head)
            if raw is not None:
                try:
                    async with self._guard():
                        if stdin and not head:
                            await raw.write_stdin(stdin)
                        if stdin is not None:
                            await raw.close_stdin()
                except BaseException:
                    with contextlib.suppress(PykataError):
                        await raw.signal(9)
                    raise
                return raw
        async with self._guard():
            started: Process = await self._container.exec(
                argv, env=envs, cwd=cwd or self._cwd, uid=who.uid, gid=who.gid, groups=who.groups,
                terminal=terminal, stdin=stdin or b"", close_stdin=stdin is not None)
        return started

    def _resolve_user(self, user: User | None) -> ExecUser:
        """A command's `user` (looked up in the image as docker exec's -u; a connected sandbox whose
        image this host no longer has takes numbers only), else the sandbox's. Raises SpecError naming
        `user`."""
        text = _user_text(user)
        if text is None:
            return self._user or ExecUser(0, 0)
        return resolve_user(self._rootfs, text, "user")

    def disk_session(self) -> contextlib.AbstractAsyncContextManager[DiskSession] | None:
        """The data disk for one file transfer, copied as the sandbox's default user from its cwd; None
        where there is none (a connected sandbox, a VM made without one, a paused sandbox)."""
        sb = self._sandbox
        if sb is None or not self._owned or self._paused or self._gone is not None or not sb.has_data_disk:
            return None
        if not sb.agent.supports(5):  # an older guest image: no copies through the disk (streamed)
            return None
        who = self._user or ExecUser(0, 0)
        return sb.data_disk(self._cid, exec_spec(["true"], env=self._env, cwd=self._cwd, uid=who.uid, gid=who.gid,
                                                 groups=who.groups))

    async def prepare_command(self) -> None:
        """Start now, with the sandbox's default env, cwd and user, the process the next `run` or `spawn`
        with those defaults (no `env`, `cwd`, `user`, terminal) becomes: a shell waiting in the guest
        for the command line, which it then `exec`s. That command is spared the exec round trip (under
        TCG most of it is `crun exec` in the guest). `Pool` does this before handing a sandbox out.
        Idempotent. Raises SandboxGoneError, AgentError."""
        if self._prepared is not None:
            return
        who = self._user or ExecUser(0, 0)
        async with self._guard():
            self._prepared = await self._container.exec(list(PREPARED_COMMAND), env=self._env, cwd=self._cwd,
                                                        uid=who.uid, gid=who.gid, groups=who.groups)

    async def _take_prepared(self, argv: Sequence[str], stdin: bytes = b"") -> Process | None:
        """The prepared shell, told to run `argv` (with `stdin` after the line: the command's input);
        None when there is none or it cannot take it."""
        line = "exec " + " ".join(shlex.quote(a) for a in argv)
        raw, self._prepared = self._prepared, None
        if raw is None or "\n" in line or "\0" in line:  # one line, no NUL: else a normal exec
            if raw is not None:
                with contextlib.suppress(PykataError):
                    await raw.signal(9)
            return None
        try:
            async with self._guard():
                await raw.write_stdin(line.encode() + b"\n" + stdin)
        except SandboxGoneError:
            raise
        except PykataError:  # it ended on its own: fall back to exec
            return None
        return raw

    async def run(self, cmd: Command, *, env: Env | None = None, cwd: str | None = None,
                  user: User | None = None, timeout: float | None = None, stdin: bytes | str | None = None,
                  max_output: int = MAX_OUTPUT) -> ExecResult:
        """Run `cmd` to completion and collect its output (a non-zero exit is a result, not an error).

        Raises SandboxTimeoutError after `timeout` seconds (the command is killed first; the error
        carries its output so far), SdkError when it prints more than `max_output` bytes (killed),
        SpecError, SandboxGoneError.
        """
        if timeout is not None and not timeout > 0:
            raise SpecError("timeout", f"{timeout} must be positive")
        if not isinstance(stdin, (bytes, str, type(None))):
            raise SpecError("stdin", f"expected bytes, str or None, not {type(stdin).__name__}")
        argv = _argv(cmd)
        data = b"" if stdin is None else stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        raw = await self._launch(argv, env=env, cwd=cwd, user=user, stdin=data)
        out = _Collected(argv, self.id, max_output)
        collect = asyncio.ensure_future(self._collect(raw, out))
        try:
            code = await asyncio.wait_for(asyncio.shield(collect), timeout)
        except TimeoutError:
            with contextlib.suppress(PykataError):
                await raw.signal(9)
            # the wait in flight answers once the command is gone, with what it printed: keep that
            with contextlib.suppress(TimeoutError, PykataError):
                await asyncio.wait_for(asyncio.shield(collect), KILLED_OUTPUT_GRACE)
            await _cancelled(collect)
            raise SandboxTimeoutError(f"{argv} did not finish within {timeout}s (killed)", sandbox_id=self.id,
                                      stdout=b"".join(out.stdout), stderr=b"".join(out.stderr)) from None
        except BaseException:  # Ctrl-C in the blocking API, too much output: the command must not run on
            await _cancelled(collect)
            with contextlib.suppress(PykataError):
                await raw.signal(9)
            raise
        return ExecResult(code, b"".join(out.stdout), b"".join(out.stderr))

    async def _collect(self, raw: Process, out: _Collected) -> int:
        """The exit status, with the output gathered into `out`: in the wait's own reply for a short
        command, else (more output, or a descendant keeps a stream open) read on until both end."""
        limit = min(out.max_output + 1, RUN_OUTPUT_LIMIT)
        async with self._guard():
            if not raw.output_with_wait:  # an older guest image: read both streams to their end, then wait
                async def drain(stream: Literal["stdout", "stderr"]) -> None:
                    async for chunk in raw.chunks(stream):
                        out.add(stream, chunk)

                readers = [asyncio.ensure_future(drain("stdout")), asyncio.ensure_future(drain("stderr"))]
                try:
                    await asyncio.gather(*readers)
                finally:  # one failed (too much output) or we are cancelled: the other stops too
                    for reader in readers:
                        reader.cancel()
                    await asyncio.gather(*readers, return_exceptions=True)
                return await raw.wait()
            while True:
                exited = await raw.wait_with_output(limit)
                out.add("stdout", exited.stdout or b"")
                out.add("stderr", exited.stderr or b"")
                if not exited.running:
                    break
            for stream, eof in (("stdout", exited.stdout_eof), ("stderr", exited.stderr_eof)):
                if not eof:
                    async for chunk in raw.chunks(stream):  # type: ignore[arg-type]
                        out.add(stream, chunk)
        return exited.status

    async def exec(self, cmd: Command, *, stdin: bytes | None = None, env: Env | None = None,
                   cwd: str | None = None, timeout: float | None = None) -> ExecResult:
        """The first SDK's name of `run`."""
        return await self.run(cmd, stdin=stdin, env=env, cwd=cwd, timeout=timeout)

    def processes(self) -> list[AsyncProcess]:
        """The processes started through this handle that have not been seen to end."""
        self._processes = [p for p in self._processes if p.running]
        return list(self._processes)

    async def stream(self, cmd: Command, *, env: Env | None = None,
                     cwd: str | None = None) -> AsyncGenerator[tuple[str, bytes], None]:
        """Run `cmd` and yield ("stdout"|"stderr", chunk) as output arrives; the exit status is
        yielded last as ("exit", b"<code>"). Leaving early kills the command."""
        proc = await self.spawn(cmd, env=env, cwd=cwd)
        finished = False
        try:
            async for item in proc:
                yield item
            status = await proc.wait()
            finished = True
            yield ("exit", str(status).encode())
        finally:
            if not finished:
                with contextlib.suppress(PykataError):
                    await proc.kill()
                await proc.detach()

    async def pty(self, cmd: Command = "sh", *, cols: int = 80, rows: int = 24, env: Env | None = None,
                  cwd: str | None = None, user: User | None = None) -> AsyncPty:
        """An interactive terminal running `cmd`: `write` keystrokes, `read` the screen output,
        `resize`. Raises SpecError, SandboxGoneError."""
        if not (0 < cols < 65536 and 0 < rows < 65536):
            raise SpecError("cols/rows", f"{cols}x{rows} is not a terminal size")
        proc = await self.spawn(cmd, env={"TERM": "xterm", **dict(e.split("=", 1) for e in _env_list(env))},
                                cwd=cwd, user=user, stdin=True, terminal=True)
        term = AsyncPty(proc, self._guard)
        await term.resize(cols, rows)
        return term

    # -- other processes ---------------------------------------------------------------------------

    @classmethod
    async def connect(cls, sandbox: str, *, config: Config | None = None) -> AsyncSandbox:
        """Reach a running sandbox another process made (by id, id prefix or name): commands and
        files work as for its owner; `close()` only disconnects, and pause/resume/metrics stay the
        owner's. Raises NotFoundError, SandboxGoneError (its owner or VM ended), AgentError."""
        config = config or load_config()
        try:
            found = lookup.find(config, sandbox, "sandbox")
        except lookup.NotFoundError as e:
            raise NotFoundError(str(e)) from None
        if not found.running:
            raise SandboxGoneError(f"sandbox {sandbox} is not running (status {found.record.status})")
        saved = _load_sdk_state(found.dir / SDK_STATE)
        sb = cls(image=next(iter(found.record.containers.values())).image if found.record.containers else "",
                 config=config, name=found.record.name)
        sb._owned = False
        sb._id = found.record.id
        sb._found = found
        sb._env = saved.get("env", [])
        sb._cwd = saved.get("cwd", "/")
        sb._user = saved.get("user")
        if sb.image_ref:  # names of a command's `user` are looked up in the image, if this host still has it
            with contextlib.suppress(PykataError):
                sb._rootfs = ImageStore(Path(config.runtime.cache_dir), config.image).resolve(sb.image_ref).rootfs
        sb._attached = await AttachedSandbox.attach(found)
        # the container's id is the sandbox's, except in a restored snapshot (the saved sandbox's)
        cid = next(iter(found.record.containers), found.record.id)
        sb._cid = cid
        sb._container = _AttachedContainer(sb._attached, cid)
        return sb

    @staticmethod
    def list(config: Config | None = None) -> list[SandboxInfo]:
        """The running sandboxes on this host (made by any process: SDK, `pykata run`)."""
        config = config or load_config()
        out = []
        for _, rec in list_sandboxes(Path(config.runtime.runtime_dir) / "sandboxes"):
            if rec is None or rec.status != "running" or not rec.owner_alive():
                continue
            image = next(iter(rec.containers.values())).image if rec.containers else ""
            out.append(SandboxInfo(rec.id, rec.name, image, rec.created_at, rec.owner_pid))
        return out

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _cancelled(task: asyncio.Future[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class _Collected:
    """What a command printed so far, and the `max_output` check."""

    def __init__(self, argv: list[str], sandbox_id: str, max_output: int) -> None:
        self.argv = argv
        self.sandbox_id = sandbox_id
        self.max_output = max_output
        self.total = 0
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []

    def add(self, stream: str, chunk: bytes) -> None:
        """Raises SdkError past `max_output` bytes (the caller kills the command)."""
        if not chunk:
            return
        self.total += len(chunk)
        if self.total > self.max_output:
            raise SdkError(f"{self.argv} printed more than {self.max_output} bytes (killed)",
                           sandbox_id=self.sandbox_id)
        (self.stdout if stream == "stdout" else self.stderr).append(chunk)


class _AttachedContainer:
    """The container of a connected sandbox, with the `exec` of an owned one."""

    def __init__(self, attached: AttachedSandbox, container_id: str) -> None:
        self._attached = attached
        self._id = container_id

    async def exec(self, args: Sequence[str], *, env: Sequence[str] = (), cwd: str = "/", uid: int = 0,
                   gid: int = 0, terminal: bool = False, stdin: bytes = b"", close_stdin: bool = False,
                   groups: Sequence[int] = ()) -> Process:
        return await self._attached.exec(self._id, args, env=env, cwd=cwd, uid=uid, gid=gid, terminal=terminal,
                                         stdin=stdin, close_stdin=close_stdin, groups=groups)


def _load_sdk_state(path: Path) -> dict[str, Any]:
    """What the owner saved for connect(); written by an SDK on this host (a runtime dir only root
    writes), still checked for shape. Defaults for a sandbox `pykata run` made."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        env, cwd, user = data.get("env"), data.get("cwd"), data.get("user")
        if isinstance(env, list) and all(isinstance(e, str) for e in env):
            out["env"] = env
        if isinstance(cwd, str) and cwd.startswith("/"):
            out["cwd"] = cwd
        if (who := ExecUser.from_list(user)) is not None:
            out["user"] = who
    return out


class AsyncPty:
    """A terminal session in a sandbox (from `AsyncSandbox.pty`)."""

    def __init__(self, proc: AsyncProcess, guard: Any) -> None:
        self.process = proc
        self._raw: Process = proc._proc
        self._guard = guard

    async def write(self, data: bytes | str) -> None:
        """Type `data` (str is UTF-8 encoded)."""
        await self.process.stdin.write(data)

    async def read(self) -> bytes | None:
        """The next output of the terminal (waits for some); None once the session ended."""
        async with self._guard():
            return await self._raw.read("stdout")

    async def resize(self, cols: int, rows: int) -> None:
        if not (0 < cols < 65536 and 0 < rows < 65536):
            raise SpecError("cols/rows", f"{cols}x{rows} is not a terminal size")
        async with self._guard():
            await self._raw.resize(rows, cols)

    async def wait(self, timeout: float | None = None) -> int:
        return await self.process.wait(timeout)

    async def kill(self) -> None:
        await self.process.kill()

    async def close(self) -> None:
        """End the session (hang up). Idempotent."""
        with contextlib.suppress(PykataError):
            await self.process.kill()
        await self.process.detach()


__all__ = ["AsyncPty", "AsyncSandbox", "ExecResult", "Metrics", "SandboxInfo"]
