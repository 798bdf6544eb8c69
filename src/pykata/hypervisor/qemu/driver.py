"""QemuHypervisor: one QEMU VM, its virtiofsd, its QMP channel and its directory, owned end to end."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pykata import ids
from pykata.config.schema import Config, SharedFs
from pykata.errors import HypervisorError
from pykata.hypervisor import fileguard, ksm, scope
from pykata.hypervisor.accel import AccelVerdict, resolve_accelerator
from pykata.hypervisor.base import AgentEndpoint, Hypervisor, ReadinessProbe, RestoreSource, VmExit
from pykata.hypervisor.devices import BlockDevice, Device, NetDevice
from pykata.hypervisor.errors import NotSupportedError, QmpError, RestoreError, VmExitedError
from pykata.hypervisor.hostinfo import host_tsc_khz
from pykata.hypervisor.jail import (
    UidLease,
    jail_spec,
    lifeline_exit,
    lifeline_prefix,
    lifeline_target,
    make_chroot,
    namespace_prefix,
)
from pykata.hypervisor.process import ChildProcess, describe_exit
from pykata.hypervisor.qemu import hotplug, migrate, nocapstone, ramreadonly
from pykata.hypervisor.qemu.assets import resolve_assets
from pykata.hypervisor.qemu.balloon import Balloon, inflate_timeout
from pykata.hypervisor.qemu.clonememory import keep_template_intact
from pykata.hypervisor.qemu.datadisk import DataDisk
from pykata.hypervisor.qemu.launch import LaunchSpec, VmPaths, build_command_line
from pykata.hypervisor.qemu.qmp import EventCallback, QmpChannel, QmpEvent, qemu_text
from pykata.hypervisor.qemu.sidecars import Sidecars
from pykata.hypervisor.qemu.slots import RootSlots
from pykata.hypervisor.readiness import (
    HOST_LEFT_MARKER,
    BootDeadline,
    Starvation,
    console_readiness,
    log_tail,
    wait_for_console_line,
)
from pykata.timing import mark

log = logging.getLogger("pykata.hypervisor")
# How long restore() waits for a restored agent's HOST_LEFT_MARKER (see _wait_host_left).
HOST_LEFT_TIMEOUT = 10.0

VHOST_VSOCK = Path("/dev/vhost-vsock")
# sun_path is 108 bytes including the NUL.
_MAX_SOCKET_PATH = 107
# "launched": QEMU runs and waits for the saved state (launch(), a pre-started VMM); start() loads it.
State = Literal["new", "prepared", "starting", "launched", "running", "stopping", "stopped"]

QMP_CONNECT_TIMEOUT = 10.0
DEADLINE_CHECK = 1.0  # seconds between looks at a booting VM's deadline (pykata.hypervisor.readiness)
GRACEFUL_TIMEOUT = 2.0
QUIT_TIMEOUT = 2.0
# A restored snapshot's agent leaves the saved host's session within this (see restore()).
AGENT_CHARDEV = "agent"  # cmdline.VirtSerialPort.id


class QemuHypervisor(Hypervisor):
    """A QEMU VM.

    `config` is the whole pykata configuration (its [hypervisor.qemu] and [runtime] sections are used).
    `kernel`/`initrd`/`image` override the configured assets; when neither names a kernel, the cached
    build from pykata.guestimage is used. `shared_dir` is served to the guest (tag "kataShared") over
    virtio-fs or 9p, per `hypervisor.qemu.shared_fs`. `readiness` decides when wait_ready() returns
    (default: the console line PYKATA_AGENT_READY). `guest_shutdown`, if given, is awaited first by
    stop() (at most 2 s) so the guest can finish cleanly; QEMU is quit after it either way.
    `on_event` receives QMP events (SHUTDOWN, STOP, RESET, ...). `vm_dir` defaults to
    <runtime_dir>/vm/<vm_id>; it must not exist yet and is removed by stop().

    `restore` starts the VM from a saved one (a template that pykata.factory made and chose; the
    driver decides nothing about templates): start() loads its state instead of booting and returns
    with the guest running where it was saved, its RAM the saved memory file mapped copy-on-write; its
    kernel, initrd and image are the saved VM's. Such a VM needs a `readiness` probe (the console line
    was printed before the save). `memory_file` puts guest RAM in that file, shared (what a template is
    made of; save() then writes only the device state). `die_with_owner`: QEMU is killed when this
    process dies, however it dies (jail.lifeline_prefix; `pid` is then the outer wrapper's): for VMs
    no one else would clean up, such as a warm pool's.
    """

    def __init__(
        self,
        vm_id: str,
        config: Config,
        *,
        kernel: Path | None = None,
        initrd: Path | None = None,
        image: Path | None = None,
        shared_dir: Path | None = None,
        extra_kernel_params: Sequence[str] = (),
        readiness: ReadinessProbe | None = None,
        guest_shutdown: Callable[[], Awaitable[None]] | None = None,
        on_event: EventCallback | None = None,
        vm_dir: Path | None = None,
        restore: RestoreSource | None = None,
        memory_file: Path | None = None,
        die_with_owner: bool = False,
    ) -> None:
        if not ids.is_valid_id(vm_id):  # a VM is named by its sandbox: the same rule
            raise HypervisorError(f"bad VM id {vm_id[:80]!r}: 1-{ids.MAX_ID_LENGTH} letters and digits, "
                                  "joined by single '.', '_' or '-'")
        self.vm_id = vm_id
        self.config = config
        self._kernel = kernel
        self._initrd = initrd
        self._image = image
        self.shared_dir = shared_dir
        self._extra_params = tuple(extra_kernel_params)
        self._readiness = readiness
        self._guest_shutdown = guest_shutdown
        self._on_event = on_event
        self.paths = VmPaths(vm_dir or config.runtime.runtime_path / "vm" / vm_id)
        self.state: State = "new"
        self.accel: AccelVerdict | None = None
        self.spec: LaunchSpec | None = None
        self.timestamps: dict[str, float] = {}
        self._devices: dict[str, Device] = {}
        self._hotplug = hotplug.Hotplugged(f"VM {vm_id}", config.qemu)
        self._slots = RootSlots(f"VM {vm_id}", config.runtime.root_slots, config.runtime.rootfs_block_max_mib << 20)
        self._data_disk = DataDisk(f"VM {vm_id}", config.runtime.data_disk_mib << 20)
        self._vcpus = config.qemu.default_vcpus
        ceiling = config.qemu.balloon_memory()
        # a booted VM starts at its ceiling until its guest is ready (_inflate_to_size)
        self._balloon = Balloon(f"VM {vm_id}", ceiling, ceiling if restore is None else config.qemu.default_memory) \
            if ceiling else None
        self._inflated = False
        self._qemu: ChildProcess | None = None
        self._sidecars = Sidecars(config.qemu, self.paths)
        self._uid_lease: UidLease | None = None
        self._net_uid_lease: UidLease | None = None  # passt's (hypervisor.qemu.user_network = "passt")
        self._qmp: QmpChannel | None = None
        self._exited: asyncio.Future[VmExit] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[VmExit | None] | None = None
        self._stop_requested = False
        self._shutdown_event: QmpEvent | None = None
        self._panicked = False
        if restore is not None and (memory_file is not None or kernel or initrd or image):
            raise HypervisorError(f"VM {vm_id}: a restored VM takes its memory and assets from the saved VM")
        self._restore = restore
        self._memory_file = memory_file
        self._die_with_owner = die_with_owner
        self._vmm_pid: int | None = None  # QEMU's own pid under a lifeline (self._qemu is the wrapper)
        self._awaiting_incoming = False
        self._load_prepared: Path | None = None  # the state file QEMU was handed (_prepare_load)
        self._early_accepted = False  # _early_connection_accepted() has waited
        self._agent_connection: socket.socket | None = None  # see take_agent_connection()

    # ---------------------------------------------------------------------------------------------
    # Properties

    @property
    def pid(self) -> int | None:
        if self._qemu is not None and self._qemu.running:
            return self._vmm_pid or self._qemu.pid
        return None

    @property
    def exited(self) -> asyncio.Future[VmExit]:
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
        return self._exited

    @property
    def agent_endpoint(self) -> AgentEndpoint:
        if self.spec is None:
            raise HypervisorError(f"VM {self.vm_id}: not prepared")
        if self.spec.agent_channel == "vsock":
            assert self.spec.vsock_cid is not None
            return AgentEndpoint("vsock", vsock_cid=self.spec.vsock_cid)
        return AgentEndpoint("virtio-serial", socket=self.paths.agent_socket)

    @property
    def console_log(self) -> Path:
        return self.paths.console_log

    @property
    def shared_fs(self) -> SharedFs:
        return self.config.qemu.shared_fs

    @property
    def restore_source(self) -> RestoreSource | None:
        return self._restore

    @property
    def qmp(self) -> QmpChannel:
        """The VM's one serialized QMP channel (for callers that need a command not wrapped here).

        Raises:
            HypervisorError: the VM is not running.
        """
        if self._qmp is None or self._qmp.closed:
            raise VmExitedError(f"VM {self.vm_id}: no QMP channel (not running)")
        return self._qmp

    @property
    def argv(self) -> list[str]:
        if self.spec is None:
            raise HypervisorError(f"VM {self.vm_id}: not prepared")
        return build_command_line(self.spec).argv()

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    async def prepare(self) -> None:
        if self.state != "new":
            raise HypervisorError(f"VM {self.vm_id}: prepare() in state {self.state}")
        q = self.config.qemu
        if self._restore is not None:
            kernel, initrd, image = self._restore.kernel, self._restore.initrd, self._restore.image
        else:
            kernel, initrd, image = resolve_assets(self.config, self._kernel, self._initrd, self._image)
        if not Path(q.path).is_file():
            raise HypervisorError(f"hypervisor.qemu.path: {q.path} does not exist")
        if self.shared_dir is not None and q.shared_fs != "none" and not self.shared_dir.is_dir():
            raise HypervisorError(f"VM {self.vm_id}: shared directory {self.shared_dir} does not exist")
        for sock in (self.paths.qmp_socket, self.paths.agent_socket, self.paths.virtiofsd_socket):
            if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
                raise HypervisorError(f"VM {self.vm_id}: socket path too long for a unix socket: {sock}")
        self.accel = await resolve_accelerator(q, kernel, self.config.runtime.cache_path)
        channel: Literal["vsock", "virtio-serial"]
        if q.agent_channel == "auto":
            channel = "vsock" if VHOST_VSOCK.exists() else "virtio-serial"
        else:
            channel = q.agent_channel
        self.spec = LaunchSpec(
            vm_id=self.vm_id, config=q, accel=self.accel.accel, kernel=kernel, initrd=initrd, image=image,
            paths=self.paths, shared_dir=self.shared_dir if q.shared_fs != "none" else None,
            agent_channel=channel,
            # CIDs are host-global; a random one in 32 bits practically never collides.
            vsock_cid=3 + secrets.randbelow(0xFFFF_0000) if channel == "vsock" else None,
            extra_kernel_params=self._extra_params,
            tsc_khz=host_tsc_khz() if self.accel.accel == "tcg" else None,
            root_slots=self._slots.count, root_slot_size=self._slots.size,
            data_disk_size=self._data_disk.size,
        )
        if self._restore is not None and self._restore.memory is None:
            # a snapshot: its stream carries the RAM, loaded into private memory named as it was saved
            self.spec = dataclasses.replace(self.spec, private_memory=True, incoming=True)
            self._awaiting_incoming = True
        elif self._restore is not None:
            self.spec = dataclasses.replace(self.spec, memory_file=self._restore.memory,
                                            memory_file_shared=False, incoming=True)
            self._awaiting_incoming = True
        elif self._memory_file is not None:
            self.spec = dataclasses.replace(self.spec, memory_file=self._memory_file, memory_file_shared=True)
        try:
            self.paths.dir.mkdir(parents=True, exist_ok=False, mode=0o700)
        except FileExistsError:
            raise HypervisorError(f"VM {self.vm_id}: {self.paths.dir} already exists (VM id in use?)") from None
        except OSError as exc:
            raise HypervisorError(f"VM {self.vm_id}: cannot create {self.paths.dir}: {exc.strerror}") from None
        try:
            self._prepare_jail()
        except BaseException:
            self._release_jail()
            shutil.rmtree(self.paths.dir, ignore_errors=True)
            raise
        self.state = "prepared"

    def _prepare_jail(self) -> None:
        """Take this VM's uid and make its empty root (pykata.hypervisor.jail). Raises HypervisorError."""
        assert self.spec is not None
        q = self.config.qemu
        if q.jail_user:
            self._uid_lease = UidLease.acquire(q, self.config.runtime.runtime_path)
            # passt gets a uid of its own: QEMU cannot signal or trace it, and the host's rules for the
            # guest's traffic match it alone. A template being made gets no stack (Sidecars).
            making_template = self._memory_file is not None and self._restore is None
            if q.user_network == "passt" and not making_template and self._user_net_nic() is not None:
                self._net_uid_lease = UidLease.acquire(q, self.config.runtime.runtime_path)
        chroot = make_chroot(self.paths.chroot) if q.jail_chroot else None
        self.spec = dataclasses.replace(self.spec, jail=jail_spec(
            q, uid=self._uid_lease.uid if self._uid_lease else None, chroot=chroot))

    def _release_jail(self) -> None:
        if self._uid_lease is not None:
            self._uid_lease.release()
            self._uid_lease = None
        if self._net_uid_lease is not None:
            self._net_uid_lease.release()
            self._net_uid_lease = None

    async def launch(self) -> None:
        """Start QEMU only, waiting for the saved state (a pre-started VMM); start() then loads the state
        and runs the guest. Only a VM started from a RestoreSource can be launched; on failure the VM is
        stopped.

        What it spares start(): QEMU's exec, dynamic linking and device set-up until QMP answers (about
        a third of a template clone's time to a ready agent under TCG). What it costs while it waits:
        QEMU's own memory (no guest page is touched before the state is loaded) and no CPU.

        While it waits it also does what the load needs and no guest sees: the early agent connection
        accepted, the migration's capabilities set and the state file handed to QEMU, so start() is
        only the load and `cont`.

        Raises:
            NotSupportedError: the VM has no restore source.
            HypervisorError: not prepared, or QEMU could not be started.
        """
        if self._restore is None:
            raise NotSupportedError(f"VM {self.vm_id}: launch() needs a VM started from a template")
        if self.state != "prepared":
            raise HypervisorError(f"VM {self.vm_id}: launch() in state {self.state}")
        await self._run_start(self._launch(), "launched")

    async def _launch(self) -> None:
        await self._spawn_vmm()
        await self._early_connection_accepted()
        assert self._restore is not None
        try:
            await self._prepare_load(self._restore.state)
        except HypervisorError as exc:  # as _load_saved_state: the saved VM itself may be unusable
            raise RestoreError(f"VM {self.vm_id}: restore failed: {exc}") from exc

    async def _prepare_load(self, path: Path) -> None:
        """migrate.prepare_load for `path` (once; restore() of that path then only runs the load)."""
        # The stream was written with x-ignore-shared when RAM is in a file; it must be read the same way.
        await migrate.prepare_load(self.qmp, path, ignore_shared=self._ignore_shared, label=f"VM {self.vm_id}")
        self._load_prepared = path

    @property
    def _ignore_shared(self) -> bool:
        return self.spec is not None and self.spec.memory_file is not None

    async def start(self) -> None:
        if self.state == "launched":
            await self._run_start(self._load_saved_state(), "running")
            return
        if self.state != "prepared":
            raise HypervisorError(f"VM {self.vm_id}: start() in state {self.state}")
        await self._run_start(self._do_start(), "running")

    async def _run_start(self, work: Awaitable[None], then: State) -> None:
        """Run a start step as the task stop() cancels; stop the VM when it fails."""
        self.state = "starting"
        self._start_task = asyncio.ensure_future(work)
        try:
            await self._start_task
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, HypervisorError | asyncio.CancelledError):
                raise
            raise HypervisorError(f"VM {self.vm_id}: start failed: {exc!r}") from exc
        self.state = then

    async def _do_start(self) -> None:
        await self._spawn_vmm()
        if self._restore is not None:
            await self._load_saved_state()

    async def _load_saved_state(self) -> None:
        self.timestamps["load"] = time.monotonic()
        self.state = "running"  # restore() runs on a running QEMU
        await self._early_connection_accepted()
        self.timestamps["accepted"] = time.monotonic()
        try:
            assert self._restore is not None
            await self.restore(self._restore.state)
        except HypervisorError as exc:
            # RestoreError tells the factory that the saved VM itself is unusable.
            raise RestoreError(f"VM {self.vm_id}: restore failed: {exc}") from exc

    async def _spawn_vmm(self) -> None:
        """QEMU started and its QMP channel connected (state "running" when it returns)."""
        assert self.spec is not None
        q = self.config.qemu
        self.timestamps["start"] = time.monotonic()
        await self._sidecars.start_virtiofsd(self.spec)
        self.timestamps["virtiofsd"] = time.monotonic()
        fds = [d.tap_fd for d in self._devices.values() if isinstance(d, NetDevice) and d.tap_fd is not None]
        self.spec = dataclasses.replace(self.spec, devices=tuple(self._devices.values()))
        self.spec = await self._sidecars.start_fd_helpers(self.spec, fds, user_net_uid=self.user_net_uid,
                                                          die_with_owner=self._die_with_owner)
        argv = build_command_line(self.spec).argv()
        if self.spec.jail is not None:
            # an empty network namespace unless QEMU itself must reach a network (a user-mode NIC on
            # libslirp, a tap it opens by name): a guest escaped into QEMU then has no socket to the
            # host's network, its localhost services or a cloud's metadata address (taps come as
            # fds; with user_network = "passt" a user-mode NIC is a stream to passt, outside QEMU)
            own_net = not any(isinstance(d, NetDevice) and (d.tap_fd is None if not d.user_net
                                                            else q.user_network == "slirp")
                              for d in self._devices.values())
            # and an IPC namespace of its own: the host's SysV IPC and POSIX message queues are
            # out of its reach, and nothing it could make there outlives it
            argv = namespace_prefix(self.spec.jail.mount_namespace, network_namespace=own_net,
                                    ipc_namespace=True) + argv
        if self._die_with_owner:
            argv = lifeline_prefix() + argv
        log.debug("VM %s: %s", self.vm_id, " ".join(argv))
        try:
            assert self._sidecars.qemu_log is not None
            # A clone's memory discards must not reach the template's file (see clonememory), nor
            # anything else it writes (see ramreadonly).
            preexec = keep_template_intact if self._restore is not None else None
            if self.spec.jail is not None and self.spec.jail.seccomp:
                # no io_uring, no setuid/setgid modes (fileguard); stacked under QEMU's own -sandbox
                preexec = fileguard.vmm_child if preexec is None else _both(preexec, fileguard.vmm_child)
            if self.spec.jail is not None and scope.supported():
                # abstract unix sockets and signals of the host stay out of QEMU's reach (scope)
                preexec = scope.confine if preexec is None else _both(scope.confine, preexec)
            template_memory = self._template_memory()
            env = None if template_memory is None else \
                await asyncio.to_thread(_clone_environment, self.config.runtime.cache_path, q.path, template_memory)
            self._qemu = await ChildProcess.spawn(argv, name="qemu", log_path=self.paths.qemu_log,
                                                  pass_fds=fds, log_fd=self._sidecars.qemu_log.guest_fd,
                                                  die_with_parent=self._die_with_owner, preexec=preexec,
                                                  merge_memory=q.mem_merge, env=env)
        except OSError as exc:
            self._sidecars.spawned(ok=False)
            raise HypervisorError(f"VM {self.vm_id}: cannot run {q.path}: {exc.strerror}") from None
        except BaseException:
            self._sidecars.spawned(ok=False)
            raise
        self._sidecars.spawned(ok=True)
        self.timestamps["qemu_spawned"] = time.monotonic()
        if q.mem_merge and not ksm.merges(self._qemu.pid):
            log.warning("VM %s: mem_merge: this kernel cannot offer all of QEMU's memory to KSM "
                        "(PR_SET_MEMORY_MERGE kept across exec needs Linux 6.7): only guest RAM", self.vm_id)
        self._qmp = QmpChannel(self.paths.qmp_socket, name=f"qmp-{self.vm_id}", on_event=self._handle_event)
        self._watcher = asyncio.create_task(self._watch(self._qemu, self._qmp), name=f"vm-watch-{self.vm_id}")
        try:
            await self._qmp.connect(QMP_CONNECT_TIMEOUT)
        except QmpError:
            code = await self._qemu.wait(0.5)
            if code is not None:
                code = lifeline_exit(code) if self._die_with_owner else code
                self._sidecars.flush()
                raise HypervisorError(
                    f"VM {self.vm_id}: QEMU {describe_exit(code)} at start: {log_tail(self.paths.qemu_log, 1500)}"
                ) from None
            raise
        self.timestamps["qmp_connected"] = time.monotonic()
        self._sidecars.check_running()
        if self._die_with_owner:  # QEMU made its QMP socket: it runs, under the lifeline's unshares
            self._vmm_pid = await asyncio.to_thread(lifeline_target, self._qemu.pid, q.path)
        if env is not None and template_memory is not None:
            ramreadonly.check_read_only(self._vmm_pid or self._qemu.pid, template_memory)
        self._connect_agent_early()
        self.state = "running"

    def _template_memory(self) -> Path | None:
        """The template's memory file a clone maps privately (None: not a clone)."""
        spec = self.spec
        if self._restore is None or spec is None or spec.memory_file is None or spec.memory_file_shared:
            return None
        return spec.memory_file

    async def _watch(self, qemu: ChildProcess, qmp: QmpChannel) -> None:
        code = await qemu.exit_code()
        if self._die_with_owner:  # QEMU's own status through its lifeline's shell
            code = lifeline_exit(code)
        self._sidecars.flush()  # QEMU's last words are in the log before anyone learns of the exit
        reason = self._exit_reason(code)
        if not self._stop_requested:
            log.warning("VM %s: QEMU %s", self.vm_id, reason)
        qmp.abort(f"VM {self.vm_id} is gone: QEMU {reason}")
        if not self.exited.done():
            self.exited.set_result(VmExit(code, reason, requested=self._stop_requested))

    def _exit_reason(self, code: int) -> str:
        if self._panicked:
            return f"{describe_exit(code)} after a guest panic"
        if self._shutdown_event is not None:
            why = qemu_text(self._shutdown_event.data.get("reason", "unknown"))
            return f"{describe_exit(code)} (shutdown: {why})"
        return describe_exit(code)

    def _handle_event(self, event: QmpEvent) -> None:
        if event.name == "SHUTDOWN":
            self._shutdown_event = event
        elif event.name == "GUEST_PANICKED":
            self._panicked = True
        if self._on_event is not None:
            self._on_event(event)

    async def wait_ready(self, timeout: float | None = None, probe: ReadinessProbe | None = None) -> None:
        if self.state != "running" or self._qemu is None:
            raise HypervisorError(f"VM {self.vm_id}: wait_ready() in state {self.state}")
        limit = self.config.qemu.boot_timeout if timeout is None else timeout
        if probe is None and self._readiness is None and self._restore is not None:
            raise HypervisorError(f"VM {self.vm_id}: a restored VM needs a readiness probe (its console "
                                  "line was printed before it was saved)")
        chosen = probe or self._readiness or console_readiness(self.paths.console_log)
        ready: asyncio.Future[None] = asyncio.ensure_future(chosen(self))
        await asyncio.sleep(0)  # the probe runs to its first await: it takes the early connection or not
        self._drop_agent_connection()  # not taken: a probe that connects anew gets the port
        exited: asyncio.Future[Any] = self.exited
        # boot_timeout counts the guest's time, not the time a loaded host gave QEMU no CPU
        deadline = BootDeadline(limit, Starvation(self.pid))
        done: set[asyncio.Future[Any]] = set()
        try:
            while not done and (left := deadline.remaining()) > 0:
                done, _ = await asyncio.wait({ready, exited}, timeout=min(left, DEADLINE_CHECK),
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not ready.done():
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ready
        if ready in done:
            exc = ready.exception()
            if exc is not None:
                raise HypervisorError(f"VM {self.vm_id}: readiness check failed: {exc}") from exc
            self.timestamps["ready"] = time.monotonic()
            await self._inflate_to_size()
            return
        tail = log_tail(self.paths.console_log)
        if self.exited.done():
            raise VmExitedError(f"VM {self.vm_id}: QEMU {self.exited.result().reason} before the guest was "
                                f"ready; console:\n{tail}\nqemu: {log_tail(self.paths.qemu_log, 800)}")
        starved = f" ({deadline.starved:.1f}s of it QEMU waited for a host CPU)" if deadline.starved >= 0.1 else ""
        raise HypervisorError(f"VM {self.vm_id}: guest not ready after {deadline.elapsed():.1f}s{starved}; "
                              f"boot_timeout {limit:.1f}s; console:\n{tail}")

    async def _inflate_to_size(self) -> None:
        """A booted VM runs with its balloon's ceiling until its guest is ready (inflating while it
        boots would slow the boot down under TCG); then the balloon takes it to default_memory. A
        restored VM's balloon is where its template left it (the same default_memory)."""
        size = self.config.qemu.default_memory
        if self._balloon is None or self._restore is not None or self._inflated or self._balloon.ceiling_mib <= size:
            return
        self._inflated = True
        started = time.monotonic()
        await self._balloon.resize(self.qmp, size, timeout=inflate_timeout(self._balloon.ceiling_mib - size))
        self.timestamps["sized"] = time.monotonic()
        log.debug("VM %s: balloon inflated to %d MiB in %.2fs", self.vm_id, size, time.monotonic() - started)

    async def stop(self) -> VmExit | None:
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._do_stop())
        # Shielded: a cancelled caller must not leave a half-stopped VM behind.
        return await asyncio.shield(self._stop_task)

    async def _do_stop(self) -> VmExit | None:
        self._stop_requested = True
        previous = self.state
        self.state = "stopping"
        self._drop_agent_connection()
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(BaseException):
                await self._start_task
        result: VmExit | None = None
        try:
            if self._qemu is not None:
                await self._end_qemu(self._qemu)
                if self._watcher is not None:
                    await self._watcher
                result = self.exited.result() if self.exited.done() else None
        finally:
            if self._qmp is not None:
                await self._qmp.close(f"VM {self.vm_id} stopped")
            mark("qemu.reaped")
            await self._sidecars.stop()
            mark("qemu.sidecars.stopped")
            self._release_jail()
            if previous != "new":
                shutil.rmtree(self.paths.dir, ignore_errors=True)
            self.state = "stopped"
        return result

    async def _end_qemu(self, qemu: ChildProcess) -> None:
        """Guest hook, then QMP quit, then SIGKILL; each step bounded; returns with QEMU reaped.

        The hook (e.g. the agent's DestroySandbox) lets the guest finish its work; it need not power the
        guest off: QEMU is quit right after it returns.
        """
        mark("qemu.end")
        if qemu.running and self._guest_shutdown is not None:
            try:
                await asyncio.wait_for(self._guest_shutdown(), GRACEFUL_TIMEOUT)
            except Exception as exc:
                log.debug("VM %s: guest shutdown hook failed: %r", self.vm_id, exc)
        if qemu.running and self._qmp is not None and not self._qmp.closed:
            mark("qemu.quit")
            try:
                await self._qmp.execute("quit", timeout=QUIT_TIMEOUT)
            except QmpError as exc:
                # e.g. "not connected": a VM stopped while it still restores (the SDK's Pool closed early)
                # cannot be asked; it is killed at once instead of after a wait and a warning
                log.debug("VM %s: QMP quit failed (%s), killing QEMU", self.vm_id, exc)
            else:
                mark("qemu.quit.answered")
                await qemu.wait(QUIT_TIMEOUT)
                if qemu.running:
                    log.warning("VM %s: QEMU did not quit, killing it", self.vm_id)
        mark("qemu.exited")
        await qemu.kill()

    # ---------------------------------------------------------------------------------------------
    # Devices and resizing

    async def add_device(self, device: Device) -> None:
        if device.id in self._devices:
            raise HypervisorError(f"VM {self.vm_id}: device id {device.id!r} already in use")
        if isinstance(device, BlockDevice) and not device.path.exists():
            raise HypervisorError(f"VM {self.vm_id}: device {device.id}: {device.path} does not exist")
        if self.state in ("new", "prepared"):
            self._devices[device.id] = device
            return
        self._require_running("add_device")
        self._require_q35("hot-plugging devices")
        await self._hotplug.add_device(self.qmp, device, shared=self._shares_memory)
        self._devices[device.id] = device

    @property
    def jail_uid(self) -> int | None:
        return self._uid_lease.uid if self._uid_lease is not None else None

    @property
    def user_net_uid(self) -> int | None:
        if self.config.qemu.user_network == "slirp":  # QEMU opens the guest's sockets itself
            return self.jail_uid if self._user_net_nic() is not None else None
        return self._net_uid_lease.uid if self._net_uid_lease is not None else None

    def _user_net_nic(self) -> NetDevice | None:
        return next((d for d in self._devices.values() if isinstance(d, NetDevice) and d.user_net), None)

    async def forward_port(self, device_id: str, host_address: str, host_port: int, guest_port: int,
                           protocol: str = "tcp") -> None:
        device = self._devices.get(device_id)
        if not isinstance(device, NetDevice) or not device.user_net:
            raise NotSupportedError(f"VM {self.vm_id}: {device_id!r} is not a user-mode network NIC")
        if self.config.qemu.user_network == "passt":
            # Debian 12's passt (0.0~git20230309) takes no answer of the guest to a forwarded connection
            # (measured: its SYN-ACK is ignored), and cannot add a forward while it runs
            raise NotSupportedError(f"VM {self.vm_id}: port forwards are not supported with "
                                    "hypervisor.qemu.user_network = \"passt\" (configuration.toml)")
        if not (0 < host_port < 65536 and 0 < guest_port < 65536) or any(ch in host_address for ch in ",: ") \
                or protocol not in ("tcp", "udp"):
            raise HypervisorError(f"VM {self.vm_id}: bad forward {protocol} {host_address}:{host_port} -> {guest_port}")
        self._require_running("forward_port")
        # QMP has no command for it; HMP's hostfwd_add answers "" or an error text.
        out = await self.qmp.execute("human-monitor-command", {
            "command-line": f"hostfwd_add netdev-{device_id} {protocol}:{host_address}:{host_port}-:{guest_port}"})
        if isinstance(out, str) and out.strip():
            raise HypervisorError(f"VM {self.vm_id}: forwarding {host_address}:{host_port}: {out.strip()[:300]}")

    async def remove_device(self, device_id: str) -> None:
        device = self._devices.get(device_id)
        if device is None:
            raise HypervisorError(f"VM {self.vm_id}: no device {device_id!r}")
        if self.state in ("new", "prepared"):
            del self._devices[device_id]
            return
        self._require_running("remove_device")
        await self._hotplug.remove_device(self.qmp, device)
        del self._devices[device_id]

    async def resize_memory(self, memory_mib: int) -> int:
        self._require_running("resize_memory")
        if self._balloon is not None:
            try:
                return await self._balloon.resize(self.qmp, memory_mib)
            except HypervisorError as exc:
                if self.state in ("stopping", "stopped"):  # QMP went down under it: say why
                    raise VmExitedError(f"VM {self.vm_id}: stopped during a memory resize") from exc
                raise
        self._require_q35("memory hotplug")
        return await self._hotplug.resize_memory(self.qmp, memory_mib, shared=self._shares_memory)

    @property
    def memory_mib(self) -> int:
        """The memory the VM is sized to now (MiB): its balloon's target, else what is plugged."""
        if self._balloon is not None:
            return self._balloon.size_mib
        return self._hotplug.memory_mib

    @property
    def memory_ceiling_mib(self) -> int:
        """The most memory resize_memory() can give this VM (MiB)."""
        if self._balloon is not None:
            return self._balloon.ceiling_mib
        if self.config.qemu.machine_type == "q35":
            return self.config.qemu.resolved_maxmemory()
        return self.config.qemu.default_memory

    async def resize_vcpus(self, vcpus: int) -> int:
        self._require_running("resize_vcpus")
        if self.config.qemu.machine_type == "microvm":
            if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= self.max_vcpus:
                raise HypervisorError(f"VM {self.vm_id}: {vcpus!r} vCPUs is outside 1..{self.max_vcpus} "
                                      "(hypervisor.qemu.default_maxvcpus)")
            self._vcpus = vcpus
            return vcpus
        self._vcpus = await self._hotplug.resize_vcpus(self.qmp, vcpus)
        return self._vcpus

    @property
    def vcpus(self) -> int:
        return self._vcpus

    @property
    def max_vcpus(self) -> int:
        return self.config.qemu.resolved_maxvcpus()

    @property
    def root_slots(self) -> int:
        return self._slots.count

    async def fill_root_slot(self, slot: int, image: Path) -> None:
        self._require_running("fill_root_slot")
        await self._slots.fill(self.qmp, slot, image)

    async def empty_root_slot(self, slot: int) -> None:
        self._require_running("empty_root_slot")
        await self._slots.empty(self.qmp, slot)

    @property
    def data_disk_size(self) -> int:
        return self._data_disk.size

    async def attach_data_disk(self, fd: int) -> None:
        self._require_running("attach_data_disk")
        await self._data_disk.attach(self.qmp, fd)

    async def detach_data_disk(self) -> None:
        if self._data_disk.attached:
            self._require_running("detach_data_disk")
            await self._data_disk.detach(self.qmp)

    async def pause(self) -> None:
        self._require_running("pause")
        await self.qmp.execute("stop")

    async def resume(self) -> None:
        self._require_running("resume")
        await self.qmp.execute("cont")

    async def save(self, path: Path) -> None:
        """Pause the guest and write its device state to `path` (its RAM stays in the shared
        `memory_file`). The VM stays paused; a template's VM is stopped right after.

        Raises:
            NotSupportedError: the VM's RAM is not in a `memory_file` (only templates are saved: a
                state without its RAM can be restored only by a clone of that file).
            HypervisorError: the VM is not running, or the migration failed or took too long.
        """
        self._require_running("save")
        if self._memory_file is None:
            raise NotSupportedError(f"VM {self.vm_id}: save() needs a VM started with memory_file (a template)")
        await migrate.save_state(self.qmp, path, label=f"VM {self.vm_id}", qemu_log=self.paths.qemu_log)
        self.timestamps["saved"] = time.monotonic()

    async def snapshot(self, fd: int) -> None:
        """Pause the guest and write its whole state, RAM included, to the open file `fd`; the VM
        stays paused (resume() runs it again; the source may go on after a snapshot).

        Only a VM whose RAM is a backend named "mem" can be (a template clone, or a restored
        snapshot): a restore loads the stream into a RAM block of that name.

        Raises:
            NotSupportedError: the VM booted cold (its RAM is not such a backend), or uses virtio-fs.
            HypervisorError: not running; QEMU refused (a mounted 9p share blocks migration) or the
                migration failed or took too long.
        """
        self._require_running("snapshot")
        assert self.spec is not None
        if self.spec.memory_file is None and not self.spec.private_memory:
            raise NotSupportedError(f"VM {self.vm_id}: only a VM started from a template or a snapshot can be "
                                    "snapshotted (factory.enable_template = true)")
        if self.spec.shared_dir is not None and self.spec.config.shared_fs == "virtio-fs":
            raise NotSupportedError(f"VM {self.vm_id}: QEMU cannot migrate virtio-fs")
        await migrate.save_snapshot(self.qmp, fd, label=f"VM {self.vm_id}", qemu_log=self.paths.qemu_log)
        self.timestamps["snapshot"] = time.monotonic()

    async def qemu_version(self) -> str:
        """QEMU's version as major.minor.micro (QMP query-version). Raises HypervisorError."""
        v = (await self.qmp.execute("query-version")).get("qemu", {})
        return f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"

    async def restore(self, path: Path) -> None:
        """Load state written by save() (or a snapshot) into this VM and run it. Only a VM started from
        a RestoreSource (QEMU waiting for an incoming migration) can be restored, once; start() does it.

        A restored snapshot was saved with a host connected to the agent's port, its agent in that host's
        session: QEMU tells the guest that host is gone once it runs, and this returns when the agent
        said it left that session (_wait_host_left), so the next host's bytes meet a fresh parser; that
        host's session hello (Agent.connect) makes the agent drop whatever the old session left.

        Raises:
            NotSupportedError: this VM was not started to receive a state.
            HypervisorError: QEMU could not load the state.
        """
        self._require_running("restore")
        if not self._awaiting_incoming:
            raise NotSupportedError(f"VM {self.vm_id}: restore() needs a VM started from a template")
        self._awaiting_incoming = False
        ignore_shared = self._ignore_shared
        if self._load_prepared != path:
            await self._prepare_load(path)
        await migrate.run_load(self.qmp, label=f"VM {self.vm_id}", qemu_log=self.paths.qemu_log)
        self.timestamps["restored"] = time.monotonic()
        if self._restore is not None:
            # the guest's page cache and mounts expect these disks: back before it runs
            for slot, image in self._restore.root_slots:
                await self._slots.fill(self.qmp, slot, image)
        await self.qmp.execute("cont")
        if not ignore_shared and self.spec is not None and self.spec.agent_channel == "virtio-serial":
            await self._wait_host_left()
        self.timestamps["resumed"] = time.monotonic()

    def _connect_agent_early(self) -> None:
        """Connect to the agent's port before a template's state is loaded (take_agent_connection).

        A template is saved with a host connected to its agent's port (pykata.factory.template), its
        agent waiting in that session for its first bytes. A host that is connected before the load
        is, to the guest, that same host: QEMU signals no change of connection once the guest runs,
        and the agent answers the clone's first request from where it waited, instead of first
        waking up to a host connecting (the port's signal, the loop's wakeup, a new session's set-up:
        ~30% of the guest code a clone's first answer ran, all of it translated afresh by TCG). The
        first bytes still begin a new session (its hello, the CRNG reseed). A template saved without
        a host, or a probe that connects anew, works as before: QEMU then tells the guest of the change.
        It is made as soon as QEMU runs (a pre-started QEMU's wait is off the clock), and the load waits
        until QEMU has accepted it (_early_connection_accepted): accepted during or after the load, it is
        a host connecting, which QEMU signals to the guest.
        """
        restore = self._restore
        if restore is None or restore.memory is None or self.spec is None or self.spec.agent_channel != "virtio-serial":
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(1.0)
            sock.connect(str(self.paths.agent_socket))  # QEMU listens since its start: no wait
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.debug("VM %s: no early agent connection (%s): the probe connects after the load", self.vm_id, exc)
            return
        self._agent_connection = sock

    async def _early_connection_accepted(self, timeout: float = 1.0) -> None:
        """Wait until QEMU has accepted the early agent connection: its socket chardev is then no longer
        "disconnected:" (query-chardev). Bounded; past `timeout` the load goes on (QEMU then tells the
        guest that a host connected, as for a template saved without one)."""
        if self._agent_connection is None or self._early_accepted:
            return
        self._early_accepted = True  # (asked once: a pre-started QEMU's launch() asks, start() need not)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chardevs = await self.qmp.execute("query-chardev")
            if any(c.get("label") == AGENT_CHARDEV and not str(c.get("filename", "")).startswith("disconnected:")
                   for c in chardevs):
                return
            await asyncio.sleep(0.001)
        log.debug("VM %s: QEMU did not accept the early agent connection within %.1fs", self.vm_id, timeout)

    def take_agent_connection(self) -> socket.socket | None:
        if self._agent_connection is not None and self.state == "running":
            sock, self._agent_connection = self._agent_connection, None
            return sock
        return None

    def _drop_agent_connection(self) -> None:
        if self._agent_connection is not None:
            self._agent_connection.close()
            self._agent_connection = None

    async def _wait_host_left(self) -> None:
        """Wait until the restored guest's agent left the saved host's session (its HOST_LEFT_MARKER line:
        QEMU tells the guest that host is gone once it runs), so the next host's bytes meet a fresh
        parser, not half a frame the saving host left. Bounded: past HOST_LEFT_TIMEOUT (the line lost to
        the console's limits, an agent without it) the restore goes on with a warning; the next host's
        session hello still keeps the old session's answers from it."""
        try:
            await asyncio.wait_for(wait_for_console_line(self.paths.console_log, HOST_LEFT_MARKER), HOST_LEFT_TIMEOUT)
        except TimeoutError:
            log.warning("VM %s: the restored guest's agent did not say within %.0fs that it left the saved "
                        "session", self.vm_id, HOST_LEFT_TIMEOUT)

    # ---------------------------------------------------------------------------------------------

    @property
    def _shares_memory(self) -> bool:
        return self.spec is not None and self.spec.shares_memory

    def _require_running(self, what: str) -> None:
        if self.state != "running" or self._qemu is None or not self._qemu.running:
            raise VmExitedError(f"VM {self.vm_id}: {what}() needs a running VM (state {self.state})")

    def _require_q35(self, what: str) -> None:
        if self.config.qemu.machine_type != "q35":
            raise NotSupportedError(f"VM {self.vm_id}: {what} needs machine_type = \"q35\" (microvm has no hotplug)")


def _both(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    """One preexec step that runs `first`, then `then`."""
    def step() -> None:
        first()
        then()
    return step


def _clone_environment(cache_dir: Path, qemu: str, template_memory: Path) -> dict[str, str] | None:
    """What a template clone's QEMU gets in its environment: the preload that opens the template's
    memory read-only (ramreadonly), and the stand-in for libcapstone (nocapstone: 1.3 MiB less per
    QEMU); None without the first (the driver then checks nothing), the second only where it works."""
    lib = ramreadonly.library(cache_dir)
    if lib is None:
        return None
    env = ramreadonly.environment(lib, template_memory)
    capstone = nocapstone.stub(cache_dir, qemu)
    if capstone is not None:
        env["LD_PRELOAD"] = f"{env['LD_PRELOAD']} {capstone}"
    return env
