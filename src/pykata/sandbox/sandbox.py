"""Sandbox: one VM, its agent, its shared directory and the containers in it.

    sandbox = await Sandbox.create(config=load_config())
    try:
        c = await sandbox.create_container("c1", spec, image.rootfs)
        await c.start()
        status = await c.init.wait()
    finally:
        await sandbox.stop()          # idempotent, concurrent-safe, bounded

Every step has a timeout, and a failure at any step unwinds what was done before it: a half-made
sandbox never stays behind. State is persisted (pykata.sandbox.state) for other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from pykata import ids, tracing
from pykata.agent.policy import IMAGE_ANNOTATION
from pykata.agentapi import Agent
from pykata.agentapi.errors import AgentCallError
from pykata.agentapi.replies import Reseeded
from pykata.config import Config, load_config
from pykata.config.schema import Virtio9pCache
from pykata.errors import InvalidArgument, PykataError, SandboxError
from pykata.factory import pool, start_vm, sync_guest_clock
from pykata.hypervisor.base import Hypervisor
from pykata.hypervisor.devices import Device, NetDevice, root_slot_serial
from pykata.hypervisor.readiness import MAX_STRETCH
from pykata.images.specshape import check_spec_shape
from pykata.network import EgressPolicy, PodNetwork, egress, guest_mac, nic_id
from pykata.network import attach as attach_network
from pykata.network import detach as detach_network
from pykata.network.holding import HoldingNetwork, hand_over
from pykata.protocols.agent import LAZY_SHARE_PROTOCOL_VERSION, agent_pb2
from pykata.resources import crifiles, emptydir, mounts, watchable
from pykata.resources.cgroups import record_path as cgroup_record_path
from pykata.resources.emptydir import EmptyDir
from pykata.resources.mounts import RootfsMount
from pykata.resources.network import nic_devices
from pykata.resources.rootimage import RootImage, RootImageCache, source_for, top_layer
from pykata.resources.rootslots import SlotTable
from pykata.sandbox import datadisk, reaper, state
from pykata.sandbox.copytree import copy_tree
from pykata.sandbox.datadisk import DiskSession
from pykata.sandbox.ocispec import (
    GUEST_SHARED_DIR,
    GUEST_STORAGE_DIR,
    Volume,
    add_volumes,
    check_host_bind_sources,
    check_security_labels,
    for_guest,
    is_host_bind,
    protected_host_dirs,
)
from pykata.sandbox.policy import load_policy
from pykata.sandbox.process import Process, exec_spec, new_exec_id, start_exec
from pykata.sandbox.proxy import serve_agent_proxy
from pykata.timing import mark

log = logging.getLogger("pykata.sandbox")
# a throwaway container in a pooled VM (Agent.warm_up): a few crun calls, slow on a loaded TCG host
WARM_UP_TIMEOUT = 60.0
# the pooled VM's throwaway container through the image path (Sandbox._warm_up_image_path)
WARM_UP_IMAGE = "pause"
WARM_UP_CONTAINER = "pykata-pool-warm-up"

SHARED_FS_TAG = "kataShared"
AGENT_PROXY_SOCKET = "agent.sock"
STOP_TIMEOUT = 20.0
# how long a stopping sandbox still answers the calls of clients already connected to its agent proxy
PROXY_DRAIN_SECONDS = 1.0
_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_id() -> str:
    return secrets.token_hex(8)


VM_DIR = state.VM_DIR


def sandboxes_dir(config: Config) -> Path:
    return Path(config.runtime.runtime_dir) / "sandboxes"


async def prepare_root_image(config: Config, rootfs: Path) -> None:
    """Build the read-only disk of image directory `rootfs` now, if containers get their image as a
    disk (`runtime.rootfs_block_slots`), so a bad image fails before any VM boots; the container's
    creation then finds it cached. Raises RootImageError naming the image."""
    if not config.runtime.root_slots:
        return
    source = source_for(rootfs, rootfs, config.runtime.cache_path)
    if source is not None:
        await asyncio.to_thread(RootImageCache(config.runtime, config.image).ensure, source)


def make_sandbox_dir(directory: Path) -> None:
    """Make a sandbox's directory, 0700 (its containers' roots and volumes are below it), with the
    runtime and sandboxes directories above it 0711: traversable, not listable.

    Raises SandboxError when it exists already."""
    for parent in (directory.parent.parent, directory.parent):
        parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(parent, 0o711)  # mkdir's mode is filtered by the umask; older versions made 0755
    try:
        directory.mkdir(mode=mounts.SANDBOX_DIR_MODE)
    except FileExistsError:
        raise SandboxError(directory.name, f"{directory} already exists (a sandbox with this id exists)") from None
    os.chmod(directory, mounts.SANDBOX_DIR_MODE)


def boot_size(config: Config, vcpus: int | None,
              memory_mib: int | None) -> tuple[Config, tuple[int | None, int | None]]:
    """The configuration a VM of `vcpus` and `memory_mib` (None: the configured default) boots with,
    and the (memory, vCPUs) to resize it to once it runs. A microvm boots as configured (a template can
    carry it) and is then sized: its balloon to any memory up to its ceiling, its CPUs onlined up to
    default_maxvcpus. Beyond the ceiling, or on q35, the VM boots at its size (at least the default)."""
    q = config.qemu
    boot_memory, boot_vcpus = q.default_memory, q.default_vcpus
    memory_after = vcpus_after = None
    if memory_mib:
        if q.balloon_memory() and memory_mib <= q.balloon_memory():
            memory_after = memory_mib if memory_mib != q.default_memory else None
        else:
            boot_memory = max(boot_memory, memory_mib)
    if vcpus:
        if q.machine_type == "microvm" and vcpus <= q.resolved_maxvcpus():
            vcpus_after = vcpus if vcpus != q.default_vcpus else None
        else:
            boot_vcpus = max(boot_vcpus, vcpus)
    if (boot_memory, boot_vcpus) != (q.default_memory, q.default_vcpus):
        config = dataclasses.replace(config, hypervisor=dataclasses.replace(
            config.hypervisor, qemu=dataclasses.replace(q, default_memory=boot_memory, default_vcpus=boot_vcpus)))
    return config, (memory_after, vcpus_after)


class Container:
    """A container in a sandbox. Its init process is `init`."""

    def __init__(self, sandbox: Sandbox, container_id: str, init: Process) -> None:
        self.sandbox = sandbox
        self.id = container_id
        self.init = init
        self._exec_seq = 0

    async def start(self) -> None:
        """Start the init process. Raises AgentError."""
        await self.sandbox.agent.start_container(self.id)
        self.sandbox._update_container(self.id, status="running")

    async def exec(self, args: Sequence[str], *, env: Sequence[str] = (), cwd: str = "/", uid: int = 0,
                   gid: int = 0, terminal: bool = False, exec_id: str | None = None, stdin: bytes = b"",
                   close_stdin: bool = False, groups: Sequence[int] = ()) -> Process:
        """Start another process in the container, with `stdin` written to it (and then closed with
        `close_stdin`; `groups`: the user's supplementary groups). Raises AgentError."""
        if exec_id is None:
            self._exec_seq += 1
            exec_id = new_exec_id(self._exec_seq)
        return await start_exec(self.sandbox.agent, self.id, exec_id, exec_spec(
            args, env=env, cwd=cwd, uid=uid, gid=gid, terminal=terminal, groups=groups), stdin, close_stdin)

    async def exec_process(self, exec_id: str, process: agent_pb2.Process) -> Process:
        """Start `process` (a whole OCI process, as the shim gets it) as `exec_id`. Raises AgentError."""
        pid = await self.sandbox.agent.exec_process(self.id, exec_id, process)
        return Process(self.sandbox.agent, self.id, exec_id, pid, process.terminal)

    async def wait(self) -> int:
        status = await self.init.wait()
        self.sandbox._update_container(self.id, status="exited", exit_code=status, finished_at=time.time())
        return status

    async def delete(self, timeout: int = 10, *, in_guest: bool = True) -> None:
        """Remove the container in the guest and its host mounts. Idempotent.

        `in_guest=False` only undoes the host mounts: for a container whose VM is about to be stopped
        anyway (its processes have ended), where removing it in the guest first is wasted time.
        """
        if in_guest:
            with contextlib.suppress(PykataError):
                await self.sandbox.agent.remove_container(self.id, timeout, timeout=timeout + 5)
        self.sandbox._release_container(self.id)


class Sandbox:
    """One VM with its agent. Make it with `await Sandbox.create(...)`; end it with `await stop()`."""

    def __init__(self, sandbox_id: str, config: Config, directory: Path) -> None:
        self.id = sandbox_id
        self.config = config
        self.dir = directory
        self.mounts = mounts.SandboxMounts(directory)
        self.shared_dir = self.mounts.shared_dir
        self.vm: Hypervisor | None = None
        self._agent: Agent | None = None
        # The agent policy to set before CreateSandbox (canonical JSON), and what a templated VM's
        # reseed answered (pykata.factory: clones must not share RNG state or boot_id).
        self.policy_json: str | None = None
        self.reseed: Reseeded | None = None
        self.containers: dict[str, Container] = {}
        # The pod's uid (CRI), from its first container, and its emptyDir volumes by name as decided
        # when first mounted: made in the guest, or (None) shared from the host (pykata.resources.emptydir).
        self.pod_uid: str | None = None
        self.pod_volumes: dict[str, EmptyDir | None] = {}
        # its kubelet-updated volumes (configmap, secret, ...) by name: copied into the guest and kept in
        # step by _poll_watched, or (None) shared from the host (pykata.resources.watchable)
        self.watched: dict[str, watchable.WatchedVolume | None] = {}
        # the names of containerd's CRI files (/etc/hosts, ...) copied into the guest, once the pod's
        # first container that binds them came (an empty set: shared from the host; pykata.resources.crifiles)
        self.cri_files: set[str] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._root_watch: watchable.RootWatch | None = None
        self._volume_changed = asyncio.Event()
        self.record = state.SandboxRecord(id=sandbox_id, owner_pid=os.getpid(), created_at=time.time())
        self._stop_task: asyncio.Task[None] | None = None
        self._resize_lock = asyncio.Lock()
        self._boot_resize: tuple[int | None, int | None] = (None, None)
        self._proxy: Any = None
        self.netns: str | None = None
        self.network: PodNetwork | None = None
        self._link: Path | None = None  # sandboxes/<id> of an adopted warm sandbox
        self._holding: HoldingNetwork | None = None  # a warm sandbox's NIC until its pod's network exists
        self.guest_share = True  # the guest mounts the shared directory (see create())
        # ...and was asked to (by CreateSandbox, or a container's CreateContainer since the lazy share): a
        # sandbox whose roots came on image disks and whose volumes live in the guest never is, and
        # can be snapshotted (pykata.sandbox.snapshot: QEMU refuses to migrate a mounted 9p share)
        self.share_mounted = False
        # container images as read-only disks in the VM's slots (made once the VM exists)
        self.root_images = RootImageCache(config.runtime, config.image)
        self.root_slots = SlotTable(0)
        self._slot_lock = asyncio.Lock()
        self._disk_lock = asyncio.Lock()  # one transfer at a time owns the data disk
        self.egress: EgressPolicy | None = None
        self._egress_uid: int | None = None  # the VMM's uid the host filter rules were made for
        # cleans up after this process if it dies with the sandbox up (pykata.sandbox.reaper)
        self._reaper: reaper.Reaper | None = None

    @property
    def agent(self) -> Agent:
        if self._agent is None:
            raise SandboxError(self.id, "the agent is not connected")
        return self._agent

    # -- creation ----------------------------------------------------------------------------------

    @classmethod
    async def create(
        cls, sandbox_id: str | None = None, *, config: Config | None = None, vcpus: int | None = None,
        memory_mib: int | None = None, hostname: str = "", name: str = "", serve_proxy: bool = True,
        boot_timeout: float | None = None, netns: str | None = None, guest_share: bool = True,
        egress: EgressPolicy | None = None, die_with_owner: bool = False,
    ) -> Sandbox:
        """Boot a VM, connect to its agent and set the sandbox up.

        `netns`: a network namespace (path) whose interfaces the VM takes over (pykata.network): a
        CNI-made pod namespace. `egress`: one NIC on a user-mode network (libslirp in QEMU, or passt
        beside a QEMU without any network: hypervisor.qemu.user_network) whose traffic the host filters
        by the uid of the process that opens its sockets (pykata.network.egress). Without either the VM
        has no NIC.
        `guest_share=False`: the guest never mounts the shared directory; container roots are copied
        into the guest (its RAM) and volumes are refused. Such a sandbox can be snapshotted (QEMU
        refuses to migrate a VM with a 9p share mounted; pykata.sandbox.snapshot).
        `die_with_owner`: QEMU is killed when this process ends, even by SIGKILL (a PID-namespace
        lifeline), and a reaper removes what the sandbox leaves on the host then (its mounts, directory
        and a shim's cgroups: pykata.sandbox.reaper). For sandboxes nobody else can use or stop: the
        SDK's, `pykata run`'s, a shim's pod.

        Raises InvalidArgument (bad sandbox id), SandboxError / HypervisorError / AgentError; nothing is
        left behind on failure.
        """
        config = config or load_config()
        config, resize_to = boot_size(config, vcpus, memory_mib)
        q = config.qemu
        sid = ids.check_sandbox_id(sandbox_id or new_id())
        directory = sandboxes_dir(config) / sid
        if directory.exists():
            raise SandboxError(sid, f"{directory} already exists (a sandbox with this id exists)")
        sb = cls(sid, config, directory)
        sb._boot_resize = resize_to
        # A bad policy fails here, naming its key, before any VM starts.
        sb.policy_json = load_policy(config.agent.pykata)
        sb.record.name = name
        sb.netns = netns
        sb.guest_share = guest_share
        runtime = config.runtime
        if runtime.enable_tracing:  # the shim has set it up already; `pykata run` and the SDK here
            tracing.setup(service="pykata", endpoint=runtime.tracing_endpoint, file=runtime.tracing_file)
        if egress is not None and netns is not None:
            raise SandboxError(sid, "a sandbox has a pod network (netns) or an egress policy, not both")
        sb.egress = egress
        try:
            with tracing.span("sandbox.create", sandbox_id=sid):
                await sb._boot(hostname or name or sid[:12], boot_timeout or q.boot_timeout, serve_proxy,
                               die_with_owner)
        except BaseException:
            await asyncio.shield(sb.stop(remove=True))
            raise
        return sb

    async def _boot(self, hostname: str, boot_timeout: float, serve_proxy: bool, die_with_owner: bool) -> None:
        await self._start_vm(boot_timeout, die_with_owner)
        await self._setup_guest(hostname, serve_proxy)

    async def _start_vm(self, boot_timeout: float, die_with_owner: bool = False, reap: bool | None = None) -> None:
        """The host side and the VM, up to its agent answering. `reap` (default: `die_with_owner`): a reaper
        removes the sandbox's mounts and directory if this process dies with the sandbox up."""
        make_sandbox_dir(self.dir)
        state.save(self.dir, self.record)
        if die_with_owner if reap is None else reap:
            # before the first mount: from here on a death leaves something to remove. Not blocking the
            # loop (the fork and setsid's exit took 19-37 ms at load 16), and in no thread
            await self._start_reaper_on_loop()
        with tracing.span("mounts.setup"):
            self.mounts.setup()
        agent_box: dict[str, Agent] = {}

        async def probe(vm: Hypervisor) -> None:
            endpoint = vm.agent_endpoint
            assert endpoint.socket is not None, "vsock agent channel is not supported by the sandbox yet"
            agent_box["agent"] = await Agent.connect(endpoint.socket, self.id, timeout=boot_timeout * MAX_STRETCH,
                                                     request_timeout=self.config.agent.pykata.request_timeout,
                                                     connection=vm.take_agent_connection())

        if self.netns is not None and self.config.runtime.internetworking_model != "none":
            with tracing.span("network.attach"):
                self.network = await attach_network(self.netns)
        # The factory decides between a template clone and a cold boot; it stops the VM if starting fails.
        mark("vm.start")
        devices: list[Device] = list(nic_devices(self.network)) if self.network is not None else []
        if self._holding is not None and self._holding.tap_fd is not None:
            devices.append(NetDevice(nic_id(0), guest_mac(0), tap_fd=self._holding.tap_fd))
        if self.egress is not None:
            devices.append(NetDevice(nic_id(0), guest_mac(0), user_net=True))
        with tracing.span("vm.start") as span:
            self.vm = await start_vm(self.id, self.config, shared_dir=self.shared_dir, readiness=probe,
                                     vm_dir=self.dir / VM_DIR, guest_shutdown=self._guest_shutdown,
                                     devices=devices, die_with_owner=die_with_owner,
                                     prepared=self._filter_egress if self.egress is not None else None)
            if span is not None:
                span.set_attribute("boot", "cold" if self.vm.restore_source is None else "template")
                span.set_attribute("vmm_pid", self.vm.pid or 0)
        if self.network is not None:
            self.network.close_fds()  # QEMU holds the taps now: they end with it
        if self._holding is not None:
            self._holding.close_tap_fd()
        mark("vm.started")
        self.record.vmm_pid = self.vm.pid
        self.root_slots = SlotTable(self.vm.root_slots)
        state.save(self.dir, self.record)
        with tracing.span("vm.wait_ready"):
            await self.vm.wait_ready(timeout=boot_timeout)
        mark("agent.ready")
        self._agent = agent_box["agent"]

    def start_reaper(self, adopted_as: str | None = None) -> None:
        """Start the process that removes this sandbox's mounts, directory and (a shim's) cgroups if
        this process dies with it up (pykata.sandbox.reaper); Sandbox.stop releases it. Never raises:
        without one, `pykata cleanup` removes what is left.

        `adopted_as`: a pooled sandbox (create_warm) that `adopt` makes the sandbox of that id, maybe
        beside this call (a thread): its reaper watches sandboxes/<id>, the link adopt makes (and the
        pool directory it names), and that id's cgroups. Called in a thread while a stop runs or after
        it, the reaper is released at once (the stop leaves nothing for it)."""
        runtime = self.config.runtime
        sid = self.id if adopted_as is None else adopted_as
        try:
            directory = self.dir if adopted_as is None else sandboxes_dir(self.config) / ids.check_sandbox_id(sid)
            self._reaper = reaper.start(directory, cgroup_record=cgroup_record_path(runtime, sid),
                                        cgroup_root=Path(runtime.cgroup_root))
        except (OSError, PykataError) as e:
            log.warning("sandbox %s: %s (if this process dies, `pykata cleanup` removes what is left)", sid, e)
            return
        if self._stop_task is not None:  # set before this thread set _reaper: the stop may not see it
            self._release_reaper()

    async def _start_reaper_on_loop(self) -> None:
        """start_reaper for this sandbox's own directory, on the loop (reaper.start_async). Shielded as
        start_reaper's thread was: a cancel here (a Create given up) does not lose a started reaper; one
        that comes after a stop began is released at once."""
        async def start() -> None:
            try:
                self._reaper = await reaper.start_async(
                    self.dir, cgroup_record=cgroup_record_path(self.config.runtime, self.id),
                    cgroup_root=Path(self.config.runtime.cgroup_root))
            except OSError as e:
                log.warning("sandbox %s: %s (if this process dies, `pykata cleanup` removes what is left)",
                            self.id, e)
                return
            if self._stop_task is not None:
                self._release_reaper()
        await asyncio.shield(start())

    async def _setup_guest(self, hostname: str, serve_proxy: bool) -> None:
        """What makes a started VM this sandbox's: clock, reseed (clones; a pooled VM was reseeded
        when it was made), policy, CreateSandbox."""
        assert self.vm is not None
        if self.vm.restore_source is not None:
            # a clone wakes up with the template's clock and randomness: independent, so sent together
            # (the reseed's first thread in the guest is slow under TCG; the clock need not wait for it)
            await asyncio.gather(self._sync_clock(), *([self._reseed_clone()] if self.reseed is None else []))
        if self.policy_json is not None:
            # Before CreateSandbox: nothing in the guest runs before the policy is in force.
            await self.agent.set_policy(self.policy_json)
        # The shared directory: mounted now only for an agent that cannot take it later (protocol < 10);
        # otherwise by the first container that needs it (_share_storages), so a pod whose roots come on
        # image disks and whose volumes live in the guest never pays for the mount.
        storages = [self._share_storage()] if self.guest_share and not self._share_on_demand() else []
        self.share_mounted = bool(storages)
        if self._boot_resize != (None, None):
            # sized after boot (balloon, CPUs onlined): the VM itself is the configured one, so a
            # template of that size can carry it
            memory, vcpus = self._boot_resize
            await self.resize(memory_mib=memory, vcpus=vcpus)
            mark("vm.sized")
        mark("guest.prepared")
        # the debug console comes from the host's configuration file only: agent settings a pod may
        # annotate are an allow-list (pykata.config.annotations.ANNOTATABLE_AGENT_KEYS) without it
        await self.agent.create_sandbox(self.id, hostname=hostname, storages=storages,
                                        debug_console=self.config.agent.pykata.debug_console_enabled)
        mark("guest.sandbox")
        if self.network is not None and self.network.endpoints:
            # (their agent RPCs are the spans of the guest's network setup)
            for iface in self.network.interfaces():
                await self.agent.update_interface(iface)
            await self.agent.update_routes(self.network.guest_routes())
        if self.egress is not None:
            await self.agent.update_interface(egress.guest_interface(guest_mac(0)))
            await self.agent.update_routes(egress.guest_routes())
        if serve_proxy:
            self._proxy = await serve_agent_proxy(self.agent, self.dir / AGENT_PROXY_SOCKET)
        self.record.status = "running"
        state.save(self.dir, self.record)
        mark("sandbox.ready")

    def _share_storage(self) -> agent_pb2.Storage:
        """The guest's mount of the shared directory (one request per sandbox: the agent refuses the
        same mount point with other options once it is mounted)."""
        assert self.vm is not None
        # a templated VM uses 9p whatever the configuration says (virtio-fs cannot be migrated);
        # posixacl: POSIX ACLs as under runc (setfacl, tar --acls, cp -a; a directory's default ACL
        # inherited), which the guest's VFS refuses on a mount without it
        if self.vm.shared_fs == "virtio-fs":
            return agent_pb2.Storage(driver="virtio-fs", source=SHARED_FS_TAG, fstype="virtiofs",
                                     mount_point=GUEST_SHARED_DIR)
        return agent_pb2.Storage(driver="9p", source=SHARED_FS_TAG, fstype="9p", mount_point=GUEST_SHARED_DIR,
                                 options=["trans=virtio", "version=9p2000.L", "msize=512000", "posixacl",
                                          *_nine_p_cache_options(self.config.qemu.virtio_9p_cache)])

    def _share_on_demand(self) -> bool:
        """Whether the guest mounts the shared directory with the first container that needs it
        (its agent keeps that mount for the sandbox) rather than in CreateSandbox."""
        return self.agent.supports(LAZY_SHARE_PROTOCOL_VERSION)

    def _share_storages(self, needed: bool) -> list[agent_pb2.Storage]:
        """What a container's CreateContainer carries first when it `needed` the shared directory: its
        mount, every time (the agent mounts it for the first and makes the others, concurrent ones
        included, wait for that mount and find it made), unless CreateSandbox mounted it."""
        if not (needed and self.guest_share and self._share_on_demand()):
            return []
        self.share_mounted = True  # before the request: a snapshot taken meanwhile must not miss it
        mark("guest.share")  # (bench/phases.py counts the runs whose container asked for it)
        return [self._share_storage()]

    # -- the warm pool (pykata.factory.pool) ----------------------------------------------------------

    @classmethod
    async def create_warm(cls, config: Config, directory: Path, *, boot_timeout: float | None = None,
                          nics: int = 0) -> Sandbox:
        """A VM restored from the template into `directory`, its agent connected, reseeded and
        warmed up (a throwaway container, factory.pool_warm_up), then paused: a sandbox waiting in the
        warm pool, to be made some pod's by `adopt`. Nothing pod-specific (clock, policy,
        CreateSandbox, hostname) has happened in the guest yet. Its QEMU dies with this process
        (factory.pool: a waiting VM must not outlive its holder).

        `nics=1`: the VM has one NIC, on a tap in a holding network namespace of its own
        (pykata.network.holding), for a pod whose network namespace `adopt` is given.

        Raises SandboxError (templates are off, `nics` not 0 or 1), NetworkError, HypervisorError,
        AgentError; nothing is left behind.
        """
        if not config.factory.enable_template:
            raise SandboxError(directory.name, "the warm pool needs factory.enable_template")
        if nics not in (0, 1):
            raise SandboxError(directory.name, f"a pooled VM has 0 or 1 NICs, not {nics}")
        sb = cls(ids.check_sandbox_id(directory.name), config, directory)
        sb.policy_json = load_policy(config.agent.pykata)
        try:
            if nics:
                sb._holding = HoldingNetwork.make()
            # no reaper: the waiting process's mounts live in its own mount namespace (which a reaper
            # would keep alive), and pool.prune removes a dead one's directory
            await sb._start_vm(boot_timeout or config.qemu.boot_timeout, die_with_owner=True, reap=False)
            assert sb.vm is not None
            if sb.vm.restore_source is None:
                raise SandboxError(sb.id, "the pooled VM booted cold instead of from the template")
            # Pod-independent guest work done now rather than at hand-out. The reseed: this VM is
            # handed to one pod only, so randomness and a boot id of its own from now on are as
            # good as at hand-out. The warm-up: a throwaway container, so the pod's first crun
            # create runs on code QEMU has translated already (pykata.agent.warmup).
            # A failed warm-up drops the VM: a guest that cannot make a container would fail its pod.
            await sb._reseed_clone()
            # (an older image: not warmed) With image slots, the throwaway takes CreateContainer's own
            # path, which covers what the agent's WarmUp does; without, the agent's WarmUp alone.
            warm = config.factory.pool_warm_up and sb.agent.supports(4)
            if warm and not await sb._warm_up_image_path():
                await sb.agent.warm_up(timeout=WARM_UP_TIMEOUT)
            if config.factory.pool_prefill_image:
                await sb._prefill_recent_image()
            await sb.vm.pause()  # no CPU while it waits (an idle guest under TCG still ticks)
        except BaseException:
            await asyncio.shield(sb.stop(remove=True))
            raise
        return sb

    async def _warm_up_image_path(self) -> bool:
        """In a pooled VM, before SetPolicy and CreateSandbox: create and remove one throwaway container
        of the builtin WARM_UP_IMAGE through CreateContainer's own path (the image's disk in a slot,
        ext4, the overlay on it, crun create), which the agent's WarmUp (an empty tmpfs root) does not
        take, so the pod's first create runs on guest code QEMU has translated (bench/claim_cpu.py
        --throwaway pause: its QEMU CPU 0.20-0.215 -> 0.125-0.135 s). Nothing of it stays but the
        image in its slot (read-only, a builtin image; a pod of that image reuses it, another image
        takes a free slot or replaces it). Only with image slots: without, the root would come over
        the shared directory, which belongs to the pod (the guest mounts it with the pod's first
        container that needs it). Raises what create_container raises."""
        assert self.vm is not None
        if not self.vm.root_slots:
            return False
        from pykata.images import ImageStore
        from pykata.sandbox.ocispec import build_spec

        image = await asyncio.to_thread(ImageStore(self.config.runtime.cache_path).resolve, WARM_UP_IMAGE)
        container = await self.create_container(WARM_UP_CONTAINER, build_spec(["true"], env=["PATH=/bin"]),
                                                image.rootfs)
        await container.delete()
        self.record.containers.pop(WARM_UP_CONTAINER, None)
        state.save(self.dir, self.record)
        return True

    async def _prefill_recent_image(self) -> None:
        """In a pooled VM: put the disk of the image pooled pods asked for last (pool.recent_image) in
        a free image slot, tentatively (rootslots): a pod whose first container has that image then
        fills no slot at hand-out (QMP round trips on the start path: bench/phases.py --pool); for a
        pod of another image, the slot is emptied before its first container is created. Nothing
        happens when there is no such disk or no free slot. Raises HypervisorError."""
        assert self.vm is not None
        key = pool.recent_image(self.config)
        disk = self.root_images.built(key) if key is not None and self.vm.root_slots else None
        if key is None or disk is None:
            return
        async with self._slot_lock:
            slot = self.root_slots.prefill(key)
            if slot is None:
                return
            try:
                await self.vm.fill_root_slot(slot, disk)
            except BaseException:
                self.root_slots.forget(slot)
                await self.vm.empty_root_slot(slot)
                raise

    async def _empty_tentative_slots(self) -> None:
        """Empty the image slots still holding a pre-filled image no container of this pod acquired
        (_prefill_recent_image), before a container runs. Raises HypervisorError (the slot stays
        recorded as tentative: the next create tries again)."""
        assert self.vm is not None
        async with self._slot_lock:
            for slot in self.root_slots.tentative():
                await self.vm.empty_root_slot(slot)
                self.root_slots.forget(slot)

    @property
    def warm_nics(self) -> int:
        """NICs of a warm sandbox not handed out yet (create_warm's `nics`)."""
        return 1 if self._holding is not None else 0

    async def take_network(self, netns: str) -> None:
        """Wire a warm sandbox's NIC (create_warm with nics=1) to the pod's one CNI interface in the
        network namespace at `netns` (pykata.network.holding.hand_over); its VM may stay paused.

        Raises:
            PoolMismatch: the pod has no CNI interface or more than one; nothing was changed and the
                sandbox can still be stopped or serve another pod.
            NetworkError: wiring failed (what was done is undone; the VM's NIC is lost).
            SandboxError: this sandbox has no NIC waiting.
        """
        if self._holding is None or self.network is not None:
            raise SandboxError(self.id, "this sandbox has no pooled NIC waiting for a pod network")
        with tracing.span("network.hand_over"):
            self.network = await hand_over(self._holding, netns)
        self.netns = netns
        self._holding.close()
        self._holding = None

    async def adopt(self, sandbox_id: str, *, hostname: str = "", name: str = "", serve_proxy: bool = True,
                    resize_to: tuple[int | None, int | None] = (None, None), netns: str | None = None) -> None:
        """Make a warm sandbox (create_warm) the sandbox `sandbox_id`: sandboxes/<id> links to its
        directory (first: from then on a dead owner's leftovers are found by its id), its NIC is wired
        to the pod's network namespace `netns` (take_network; a VM made with a NIC needs one), the VM
        runs again, and the guest is set up as for any clone (clock, policy, CreateSandbox, its
        network; it was reseeded when pooled) now, at hand-out, and resized to `resize_to` (memory
        MiB, vCPUs; None: unchanged: boot_size()'s second value). On failure the sandbox is stopped.

        Raises InvalidArgument (bad id), SandboxError (the id is taken, or `netns` does not match the
        VM's NICs), PoolMismatch / NetworkError (see take_network), AgentError, HypervisorError.
        """
        try:
            if (netns is not None) != (self._holding is not None):
                raise SandboxError(self.id, f"a pooled VM with {self.warm_nics} NICs cannot take "
                                            f"{'a' if netns else 'no'} pod network")
            self._boot_resize = resize_to
            sid = ids.check_sandbox_id(sandbox_id)
            link = sandboxes_dir(self.config) / sid
            link.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
            try:
                os.symlink(self.dir, link)
            except FileExistsError:
                raise SandboxError(sid, f"{link} already exists (a sandbox with this id exists)") from None
            self._link = link
            self.id = sid
            self.record.id = sid
            self.record.name = name
            self.record.owner_pid = os.getpid()
            self.record.created_at = time.time()
            assert self.vm is not None
            if netns is not None:
                # before the VM runs again: the guest's NIC sees the pod's network from its first instruction
                await self.take_network(netns)
            await self.vm.resume()
            mark("vm.started")
            mark("agent.ready")
            await self._setup_guest(hostname or name or sid[:12], serve_proxy)
        except BaseException:
            await asyncio.shield(self.stop(remove=True))
            raise
    async def _filter_egress(self, vm: Hypervisor) -> None:
        """The host's filter rules for the VM's traffic, made before QEMU runs. Raises EgressError."""
        assert self.egress is not None
        uid = vm.user_net_uid
        if uid is None:
            raise egress.EgressError("network='egress' needs the VMM (and passt) to run as uids of their own "
                                     "(hypervisor.qemu.jail_user = true)")
        self._egress_uid = uid
        try:  # rules an owner killed with SIGKILL left (pykata.network.egress.sweep)
            await egress.sweep()
        except PykataError as e:
            log.warning("sandbox %s: sweeping stale filter rules: %s", self.id, e)
        await egress.install(self.egress, uid, self.id)

    async def forward_port(self, guest_port: int, host_port: int, host_address: str = "127.0.0.1",
                           protocol: str = "tcp") -> None:
        """Forward `protocol` ("tcp" or "udp") host_address:host_port to `guest_port` in an egress sandbox.
        Raises SandboxError (no egress NIC), HypervisorError (port taken), NotSupportedError (passt)."""
        if self.egress is None or self.vm is None:
            raise SandboxError(self.id, "forwarding a port needs a sandbox made with an egress network")
        await self.vm.forward_port(nic_id(0), host_address, host_port, guest_port, protocol)

    async def _sync_clock(self) -> None:
        await sync_guest_clock(self.agent)
        mark("guest.clock")

    async def _reseed_clone(self) -> None:
        """Give a VM cloned from a template its own randomness and boot id (agent ReseedRandomDev),
        before anything runs in it. Raises AgentError."""
        boot_id = str(uuid.uuid4())
        reseeded = await self.agent.reseed_random_dev(secrets.token_bytes(64), boot_id)
        if reseeded.boot_id != boot_id:
            raise SandboxError(self.id, "the agent did not take the clone's new boot id")
        self.reseed = reseeded

    async def _guest_shutdown(self) -> None:
        # Nothing to wind down when every container has exited: the VM is simply ended (the guest
        # holds no state the host keeps), which saves a round of guest work per `run --rm`.
        if all(c.status == "exited" for c in self.record.containers.values()):
            return
        if self._agent is not None and not self._agent.closed:
            await self._agent.destroy_sandbox(2, timeout=3)

    # -- containers --------------------------------------------------------------------------------

    async def create_container(
        self, container_id: str, spec: dict[str, Any], rootfs: Path | Sequence[RootfsMount], *,
        volumes: Sequence[Volume] = (), image: str = "", terminal: bool | None = None,
        pid_ns_container: str = "",
    ) -> Container:
        """Mount the container's root and volumes into the shared directory and create the container
        in the guest (not started); with `pid_ns_container`, in the pid namespace of that container.

        `rootfs` is either a read-only directory (an image; a writable overlay goes on top) or the
        mounts that make the root, as containerd passes them (an overlay of snapshots, a bind).
        Raises InvalidArgument (bad id), SandboxError (duplicate), MountError, AgentError; undoes its
        mounts on failure.
        """
        ids.check_container_id(container_id)
        check_spec_shape(spec)
        check_security_labels(spec.get("process"), spec.get("linux"))
        if container_id in self.containers:
            raise SandboxError(self.id, f"container {container_id} already exists")
        try:
            os.mkdir(self.mounts.mounts_dir / container_id, 0o755)
        except FileExistsError:
            raise SandboxError(self.id, f"container {container_id} already exists") from None
        try:
            in_guest = self.config.runtime.rootfs_upper == "guest" or not self.guest_share
            full_spec = add_volumes(spec, list(volumes))
            pod_volumes = self._pod_volumes(container_id, full_spec)
            copied = {**await self._watched_volumes(container_id, full_spec),
                      **await self._cri_files(container_id, full_spec)}
            check_host_bind_sources(full_spec, self._protected_dirs(), skip={*pod_volumes, *copied})
            guest_spec, shares = for_guest(full_spec, container_id,
                                           {**{i: vol.guest_path for i, vol in pod_volumes.items()}, **copied})
            disk = None
            if self.guest_share:
                if in_guest:
                    # an image disk built before needs nothing of the host's mount of the root: the
                    # host mounts it only to build a disk or to share the root with the guest
                    disk = await self._root_disk(container_id, rootfs, cached_only=True)
                if disk is not None:
                    root_mode = disk[1].root_mode
                else:
                    with tracing.span("mounts.rootfs", container_id=container_id):
                        self.mounts.add_rootfs(container_id, rootfs, self.dir / "overlay" / container_id,
                                               lower_only=in_guest)
                    root_mode = stat.S_IMODE(os.stat(self.mounts.mounts_dir / container_id / "rootfs").st_mode)
            else:
                if shares:
                    raise SandboxError(self.id, f"container {container_id}: volumes need the shared directory, "
                                                "and this sandbox has none (made for snapshots)")
                if not isinstance(rootfs, Path):
                    raise SandboxError(self.id, f"container {container_id}: without the shared directory the "
                                                "root must be an image directory")
                root_mode = stat.S_IMODE(os.stat(rootfs).st_mode)
            storages = []
            root_on_share = not in_guest
            if in_guest:
                # the image as a read-only disk when a slot takes it (a snapshot records which image
                # each slot holds, by its key, and a restore fills them again)
                if disk is None:
                    disk = await self._root_disk(container_id, rootfs)
                root_on_share = disk is None
                if disk is None and not self.guest_share:
                    assert isinstance(rootfs, Path)
                    await copy_tree(self.agent, rootfs, f"{GUEST_SHARED_DIR}/{container_id}/rootfs")
                storages = self._guest_overlay(container_id, root_mode, disk)
                guest_spec["root"]["path"] = storages[-1].mount_point
                if disk is not None and not self.containers and container_id != WARM_UP_CONTAINER:
                    pool.remember_image(self.config, disk[1].key)  # for the pool's next VMs
            if self.root_slots.tentative():
                await self._empty_tentative_slots()
            # the shared directory: for a root not on an image disk, and for host volumes
            storages = [*self._share_storages(root_on_share or bool(shares)),
                        *self._pod_volume_storages(pod_volumes.values()),
                        *storages]
            if image:
                # The image name the agent policy's containers.images matches (CRI sets it itself).
                notes = guest_spec.get("annotations")
                guest_spec["annotations"] = {**(notes if isinstance(notes, dict) else {}),
                                             IMAGE_ANNOTATION: notes.get(IMAGE_ANNOTATION, image)
                                             if isinstance(notes, dict) else image}
            for i, vol in enumerate(shares):
                self.mounts.add_volume(container_id, i, vol.host, readonly=vol.readonly,
                                       propagation=vol.propagation)
            tty = bool(guest_spec["process"].get("terminal")) if terminal is None else terminal
            mark("rootfs.mounted")
            pid = await self.agent.create_container(container_id, json.dumps(guest_spec), terminal=tty,
                                                    storages=storages, pid_ns_container=pid_ns_container)
            mark("guest.created")
        except BaseException:
            self._release_container(container_id)
            raise
        c = Container(self, container_id, Process(self.agent, container_id, "", pid, tty))
        self.containers[container_id] = c
        self.record.containers[container_id] = state.ContainerRecord(
            id=container_id, image=image, command=list(spec["process"]["args"]), created_at=time.time(),
            user=_process_user(spec["process"]))
        state.save(self.dir, self.record)
        return c

    def _protected_dirs(self) -> list[Path]:
        from pykata.config.load import SYSTEM_PATH

        return protected_host_dirs(self.config.runtime.runtime_path, self.config.runtime.cache_path,
                                   Path(self.config.factory.template_path), SYSTEM_PATH.parent)

    def _pod_volumes(self, container_id: str, spec: dict[str, Any]) -> dict[int, EmptyDir]:
        """The spec's mounts that are the pod's emptyDir volumes made in the guest, by index
        (pykata.resources.emptydir has the rule). Raises InvalidArgument naming the mount's source."""
        uid = emptydir.pod_uid(spec)
        if self.pod_uid is None and not self.containers:
            self.pod_uid = uid  # the pod's first container (CRI: its sandbox container) names the pod
        runtime = self.config.runtime
        if runtime.disable_guest_empty_dir or uid is None or uid != self.pod_uid:
            return {}
        binds = [(i, f"mounts[{i}].source", str(m["source"])) for i, m in enumerate(spec.get("mounts") or [])
                 if isinstance(m, dict) and is_host_bind(m)]
        # subPath mounts first: such a volume stays on the host for the whole pod (kubelet made the
        # subPath's directory there), unless it is in the guest already
        for _, field, source in binds:
            name = emptydir.subpath_volume(source, runtime.kubelet_root_dir, uid)
            if name is not None:
                if self.pod_volumes.get(name) is not None:
                    raise InvalidArgument(field, f"a subPath of emptyDir {name!r}, which this pod has in the "
                                                 "guest: not supported (runtime.disable_guest_empty_dir = true "
                                                 "shares emptyDirs from the host)")
                self.pod_volumes.setdefault(name, None)
        found: dict[int, EmptyDir] = {}
        for i, field, source in binds:
            name = emptydir.volume_name(source, field, runtime.kubelet_root_dir, uid)
            if name is None:
                continue
            if name not in self.pod_volumes:
                vol = emptydir.inspect(source, name, field)
                if vol is None:
                    log.warning("sandbox %s: container %s: emptyDir %s already holds files on the host: "
                                "shared from the host, not made in the guest", self.id, container_id, name)
                self.pod_volumes[name] = vol
            known = self.pod_volumes[name]
            if known is not None:
                found[i] = known
        return found

    async def _watched_volumes(self, container_id: str, spec: dict[str, Any]) -> dict[int, str]:
        """The spec's read-only binds of the pod's configmap/secret/downwardAPI/projected volumes that
        are copied into the guest, by index, as their guest paths: the first container that mounts
        one copies it (SyncVolume) and starts the shim's watch of the host directories; a volume that
        cannot be copied is shared from the host for the whole pod (pykata.resources.watchable).
        Raises AgentError when the agent is gone."""
        runtime = self.config.runtime
        uid = emptydir.pod_uid(spec)
        if not runtime.watchable_max_files or uid is None or uid != self.pod_uid:
            return {}
        found: dict[int, str] = {}
        for i, m in enumerate(spec.get("mounts") or []):
            if not isinstance(m, dict) or not is_host_bind(m) or "ro" not in (m.get("options") or []):
                continue
            name = watchable.volume_name(str(m["source"]), runtime.kubelet_root_dir, uid)
            if name is None:
                continue
            if name not in self.watched:
                self.watched[name] = vol = await self._copy_volume(container_id, name, str(m["source"]))
                if vol is not None:
                    self._watch_root(vol)
            if self.watched[name] is not None:
                found[i] = f"{emptydir.GUEST_POD_VOLUME_DIR}/{name}"
        if found and self._watch_task is None:
            self._watch_task = asyncio.ensure_future(self._poll_watched())
        return found

    async def _cri_files(self, container_id: str, spec: dict[str, Any]) -> dict[int, str]:
        """The spec's binds of containerd's CRI files of this pod (/etc/hosts, /etc/hostname,
        /etc/resolv.conf), by index, as their guest paths: the first container that binds them copies
        them all into a pod volume of the guest (SyncVolume), so a pod needs the shared directory only
        for what really is the host's (pykata.resources.crifiles). Files that cannot be copied (an agent
        or policy without SyncVolume, a file too large) are shared from the host for the whole pod.
        Raises AgentError when the agent is gone."""
        found: dict[int, str] = {}
        sandbox_dir = ""
        for i, m in enumerate(spec.get("mounts") or []):
            name = crifiles.cri_file(m, self.id)
            if name is not None:
                found[i], sandbox_dir = name, posixpath.dirname(str(m["source"]))
        if not found:
            return {}
        volume = crifiles.volume_name(self.id)
        if self.cri_files is None:
            try:
                tree = await asyncio.to_thread(crifiles.entries, sandbox_dir)
                mark("cri_files.read")
                await self.agent.sync_volume(volume, crifiles.TMPFS_BYTES, tree)
                mark("cri_files.copied")
                self.cri_files = {e.path for e in tree if e.path}
            except (crifiles.Unsuitable, AgentCallError) as e:
                log.warning("sandbox %s: container %s: containerd's /etc files are shared from the host, not "
                            "copied into the guest: %s", self.id, container_id, e)
                self.cri_files = set()
        return {i: f"{emptydir.GUEST_POD_VOLUME_DIR}/{volume}/{name}" for i, name in found.items()
                if name in self.cri_files}

    def _watch_root(self, vol: watchable.WatchedVolume) -> None:
        """inotify on the volume's root directory (made with the first volume), so that the watch
        looks as soon as kubelet wrote; without it (no inotify, no watches left) it polls each second."""
        try:
            if self._root_watch is None:
                self._root_watch = watchable.RootWatch(self.config.runtime.runtime_path / "inotify")
                asyncio.get_running_loop().add_reader(self._root_watch.fd, self._on_volume_event)
            self._root_watch.add(vol.source)
            vol.notified = True
        except OSError as e:
            log.warning("sandbox %s: volume %s: no inotify (polled each second): %s", self.id, vol.name, e)

    def _on_volume_event(self) -> None:
        # drained here: the reader is level-triggered, and the watch waits for a quiet moment
        assert self._root_watch is not None
        try:
            self._root_watch.drain()
        except OSError as e:
            log.warning("sandbox %s: reading the volumes' inotify events: %s", self.id, e)
        self._volume_changed.set()

    async def _copy_volume(self, container_id: str, name: str, source: str) -> watchable.WatchedVolume | None:
        """Copy volume `name` into the guest; None (shared from the host) when it is unsuitable or the
        agent refuses (an older guest image, a policy). Raises AgentError when the agent is gone."""
        runtime = self.config.runtime
        vol = watchable.WatchedVolume(name, source, runtime.watchable_max_files, runtime.watchable_max_kib << 10)
        try:
            snap = None
            for _ in range(5):  # kubelet may be writing it right now
                snap = await asyncio.to_thread(watchable.snapshot, vol)
                if snap is not None:
                    break
                await asyncio.sleep(0.05)
            if snap is None:
                raise watchable.Unsuitable(f"{source}: kept changing while read")
            await self.agent.sync_volume(name, vol.tmpfs_size, snap[0])
        except (watchable.Unsuitable, AgentCallError) as e:
            log.warning("sandbox %s: container %s: volume %s is shared from the host, not copied into the "
                        "guest: %s", self.id, container_id, name, e)
            return None
        vol.signature = snap[1]
        mark("volume.copied")
        return vol

    async def _poll_watched(self) -> None:
        """Keep the guest's copies in step with the host directories (kubelet's updates): after each
        burst of inotify events on their root directories (and every FULL_POLL_SECONDS; every
        POLL_SECONDS without inotify), an lstat of every entry; a changed tree is sent whole once it
        held still while read. A failure (the directory gone with the pod, a tree grown past the bounds, the agent
        busy) is logged once and retried: the guest keeps its last copy."""
        soon = False  # a tree caught changing: look again after POLL_SECONDS, not FULL_POLL_SECONDS
        while True:
            volumes = [v for v in self.watched.values() if v is not None]
            notified = all(v.notified for v in volumes) and not soon
            wait = watchable.FULL_POLL_SECONDS if notified else watchable.POLL_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._volume_changed.wait(), wait)
            while self._volume_changed.is_set():  # a burst of kubelet's writes: look once it is over
                self._volume_changed.clear()
                await asyncio.sleep(watchable.QUIET_SECONDS)
            soon = False
            for vol in volumes:
                try:
                    # off the loop, as the snapshot: a scan may meet a slow file system
                    if await asyncio.to_thread(watchable.signature, vol) == vol.signature:
                        continue
                    snap = await asyncio.to_thread(watchable.snapshot, vol)
                    if snap is None:
                        soon = True
                        continue
                    await self.agent.sync_volume(vol.name, vol.tmpfs_size, snap[0])
                    vol.signature, vol.warned = snap[1], ""
                    mark("volume.synced")
                except watchable.Changing:
                    soon = True
                except (PykataError, OSError) as e:
                    if str(e) != vol.warned:
                        log.warning("sandbox %s: volume %s: the guest keeps its last copy: %s", self.id, vol.name, e)
                        vol.warned = str(e)

    def _pod_volume_storages(self, volumes: Iterable[EmptyDir]) -> list[agent_pb2.Storage]:
        """The guest tmpfs of each emptyDir (the agent mounts it for the first container that names
        it and keeps it for the sandbox), at most runtime.emptydir_size MiB; 0: the bound of a
        container's writable layer (runtime.rootfs_upper_size), else half the VM's memory."""
        runtime = self.config.runtime
        cap = (runtime.emptydir_size or runtime.rootfs_upper_size
               or max((self.vm.memory_mib if self.vm else 0) // 2, 16))
        return [agent_pb2.Storage(driver="tmpfs", source="tmpfs", fstype="tmpfs", mount_point=vol.guest_path,
                                  options=vol.tmpfs_options(cap)) for vol in {v.name: v for v in volumes}.values()]

    async def _root_disk(self, container_id: str, rootfs: Path | Sequence[RootfsMount], *,
                         cached_only: bool = False) -> tuple[int, RootImage] | None:
        """The image slot holding the container's image as a read-only disk (built and cached by
        pykata.resources.rootimage, put in a slot of the VM if no slot holds it yet), or None: the
        VM has no slot free (or none at all), or the root has no stable identity; its layers then
        reach the guest through the shared directory. `cached_only`: None also when the disk is not
        built yet (building it reads the root as the host mounted it). Raises RootImageError,
        HypervisorError."""
        if self.vm is None or not self.vm.root_slots:
            return None
        source = source_for(rootfs, self.mounts.mounts_dir / container_id / "rootfs", self.config.runtime.cache_path)
        if source is None:
            if not cached_only:
                log.info("sandbox %s: container %s: its root has no stable identity; shared directory", self.id,
                         container_id)
            return None
        if cached_only:
            top = top_layer(rootfs)
            try:
                image = self.root_images.cached(source, os.stat(top).st_mode) if top is not None else None
            except OSError:
                image = None
            if image is None:
                return None
        else:
            image = await asyncio.to_thread(self.root_images.ensure, source)
        mark("rootfs.image")
        async with self._slot_lock:
            grant = self.root_slots.acquire(image.key, container_id)
            if grant is None:
                if not cached_only:
                    log.info("sandbox %s: container %s: all %d image slots are in use; shared directory",
                             self.id, container_id, self.vm.root_slots)
                return None
            if grant.fill:
                try:
                    await self.vm.fill_root_slot(grant.slot, image.path)
                except BaseException:
                    self.root_slots.forget(grant.slot)
                    raise
                mark("rootfs.slot")
        return grant.slot, image

    def _guest_overlay(self, container_id: str, root_mode: int, disk: tuple[int, RootImage] | None
                       ) -> list[agent_pb2.Storage]:
        """The storages that make a container's root in the guest: the read-only layers (the image's
        disk in slot `disk`, else what the host shares at mounts/<cid>/rootfs, or their copy in the
        guest), a tmpfs for its upper layer and an overlay of the two; the last one's mount point is
        the root. The overlay's root takes the upper directory's mode, `root_mode`: the image
        root's, as under runc."""
        base = f"{GUEST_STORAGE_DIR}/{container_id}"
        lowers: list[agent_pb2.Storage] = []
        if disk is not None:
            slot, image = disk
            lower = f"{base}/lower"
            lowers.append(agent_pb2.Storage(driver="virtio-blk", source=f"serial:{root_slot_serial(slot)}",
                                            fstype="ext4", mount_point=lower, options=["ro"],
                                            driver_options=[f"prefetch={image.prefetch}"]))
        else:
            lower = f"{GUEST_SHARED_DIR}/{container_id}/rootfs"
        size = self.config.runtime.rootfs_upper_size
        prewarm = self.config.runtime.rootfs_prewarm
        if disk is not None and disk[1].used_inodes < self.config.runtime.rootfs_prewarm_min_inodes:
            # a small image's whole first walk costs about what its prewarm costs the host while
            # other VMs start (busybox: ~300 inodes, ~0.05 QEMU CPU s); the prewarm pays for big trees
            prewarm = 0
        # xino=on: the layers are on different file systems (image disk or share below, tmpfs above), and
        # without it overlayfs gives a directory a made-up st_ino that readdir's d_ino does not match
        # (CPython's test_os.TestScandir.test_attributes saw it); with it both are the real inode number
        # with the layer in its high bits, and they match as under runc (an inode too big for that gets the
        # old mapping back, with a warning in the guest kernel log).
        return [
            *lowers,
            agent_pb2.Storage(driver="tmpfs", source="tmpfs", fstype="tmpfs", mount_point=f"{base}/scratch",
                              options=["mode=0700", *([f"size={size}m"] if size else [])]),
            agent_pb2.Storage(driver="local", mount_point=f"{base}/scratch/upper",
                              driver_options=[f"mode={root_mode:o}"]),
            agent_pb2.Storage(driver="local", mount_point=f"{base}/scratch/work", driver_options=["mode=700"]),
            agent_pb2.Storage(driver="overlay", source="overlay", fstype="overlay", mount_point=f"{base}/rootfs",
                              options=[f"lowerdir={lower}", f"upperdir={base}/scratch/upper",
                                       f"workdir={base}/scratch/work", "xino=on"],
                              driver_options=[f"prewarm={prewarm}"] if disk is not None and prewarm else []),
        ]

    @property
    def has_data_disk(self) -> bool:
        """Whether the VM has a data disk (bulk file transfers, pykata.sandbox.datadisk)."""
        return self.vm is not None and self.vm.data_disk_size > 0

    @property
    def data_disk_lock(self) -> asyncio.Lock:
        """Held by each transfer through the data disk; a snapshot holds it too, so that the VM is never
        saved with a file of the host's behind the disk."""
        return self._disk_lock

    @contextlib.asynccontextmanager
    async def data_disk(self, container_id: str, process: agent_pb2.Process) -> AsyncIterator[DiskSession]:
        """The data disk for one transfer of files of container `container_id`, copied by its process
        `process` (user, cwd); transfers of one sandbox take turns. Raises SandboxError (no VM or no
        data disk), HypervisorError, OSError."""
        if self.vm is None or not self.vm.data_disk_size:
            raise SandboxError(self.id, "the VM has no data disk (runtime.data_disk_mib = 0)")
        async with self._disk_lock, datadisk.session(self.vm, self.agent, self.dir, container_id, process) as s:
            yield s

    def _release_container(self, container_id: str) -> None:
        self.containers.pop(container_id, None)
        self.root_slots.release(container_id)
        try:
            self.mounts.release(container_id)
        except PykataError as e:
            log.warning("sandbox %s: container %s: %s", self.id, container_id, e)
        mounts.remove_unmounted(self.mounts.mounts_dir / container_id)
        shutil.rmtree(self.dir / "overlay" / container_id, ignore_errors=True)

    def _update_container(self, container_id: str, **changes: Any) -> None:
        rec = self.record.containers.get(container_id)
        if rec is None:
            return
        for k, v in changes.items():
            setattr(rec, k, v)
        with contextlib.suppress(OSError):
            state.save(self.dir, self.record)

    # -- the VM ------------------------------------------------------------------------------------

    async def pause_vm(self) -> None:
        """Stop the VM's vCPUs (no CPU used; memory, processes and connections kept). Raises
        SandboxError when there is no VM, HypervisorError."""
        if self.vm is None:
            raise SandboxError(self.id, "no VM to pause")
        await self.vm.pause()

    async def resume_vm(self) -> None:
        """Run a paused VM again. Raises SandboxError, HypervisorError."""
        if self.vm is None:
            raise SandboxError(self.id, "no VM to resume")
        await self.vm.resume()
        if self._agent is not None:
            # the guest's clock stood still while its vCPUs did
            now = time.time_ns() // 1000
            await self.agent.set_guest_date_time(now // 1_000_000, now % 1_000_000, timeout=5)

    async def resize(self, *, memory_mib: int | None = None, vcpus: int | None = None) -> tuple[int, int]:
        """Size the running VM to `memory_mib` and/or `vcpus` (None: unchanged); return (memory MiB,
        vCPUs) now. Memory moves the VM's balloon (microvm) or plugs a DIMM (q35), and waits for the
        guest; vCPUs are onlined or offlined by the agent (microvm) or hot-plugged (q35). Resizes of
        one sandbox run one at a time, in call order; asking for the current size is a no-op.

        The guest carries out both (it runs the balloon driver and onlines CPUs), so a guest that does
        not follow fails its resize, bounded in time; what bounds its use of the host is the host
        cgroup (the shim sets it, see pykata.resources.cgroups.SandboxCgroup.set_limits).

        Raises:
            SandboxError: no running VM.
            HypervisorError: outside what the VM can have (naming the configuration key), the guest did
                not follow in time, or the VM stopped meanwhile.
            AgentError: the agent refused to change the online CPUs.
        """
        if self.vm is None or self._stop_task is not None:
            raise SandboxError(self.id, "no running VM to resize")
        async with self._resize_lock:
            if self._stop_task is not None:  # stopped while this one waited for the one before
                raise SandboxError(self.id, "no running VM to resize (it is being stopped)")
            if memory_mib is not None and memory_mib != self.vm.memory_mib:
                await self.vm.resize_memory(memory_mib)
            if vcpus is not None and vcpus != self.vm.vcpus:
                before = self.vm.vcpus
                await self.vm.resize_vcpus(vcpus)
                if self.config.qemu.machine_type == "microvm":
                    try:
                        await self.agent.online_cpu_mem(nb_cpus=vcpus, cpu_only=True)
                    except BaseException:
                        with contextlib.suppress(PykataError):  # the record follows the guest, not the wish
                            await self.vm.resize_vcpus(before)
                        raise
            return self.vm.memory_mib, self.vm.vcpus

    # -- what the shim asks of a container (one layer down: the agent) -----------------------------

    async def pause_container(self, container_id: str) -> None:
        """Freeze every process of the container. Raises AgentError."""
        await self.agent.pause_container(container_id)

    async def resume_container(self, container_id: str) -> None:
        """Thaw a paused container. Raises AgentError."""
        await self.agent.resume_container(container_id)

    async def signal_process(self, container_id: str, exec_id: str, signal: int, *,
                             all_processes: bool = False) -> None:
        """Signal a container's init (exec_id "") or exec, or every process of it. Raises AgentError."""
        await self.agent.signal_process(container_id, exec_id, signal, all_processes=all_processes)

    async def update_container(self, container_id: str, linux_resources: dict[str, Any]) -> None:
        """Apply an OCI `linux.resources` object to the container. Raises AgentError."""
        await self.agent.update_container(container_id, linux_resources)

    async def stats_container(self, container_id: str, *, timeout: float | None = None) -> agent_pb2.CgroupStats:
        """The container's cgroup statistics, read in the guest (bounded), within `timeout` seconds (None:
        the agent's request timeout). Raises AgentError."""
        if timeout is None:
            return (await self.agent.stats_container(container_id)).cgroup_stats
        return (await self.agent.stats_container(container_id, timeout=timeout)).cgroup_stats

    async def next_oom_event(self) -> str:
        """Wait for the next OOM kill in the guest; the id of its container ("" for none).
        Raises AgentError (AgentCallError with code UNAVAILABLE once the agent is gone)."""
        return await self.agent.get_oom_event()

    async def disconnect_agent(self) -> None:
        """Close the agent connection (the VM keeps running until stop())."""
        if self._agent is not None:
            await self._agent.close()

    # -- teardown ----------------------------------------------------------------------------------

    async def stop(self, *, remove: bool = True) -> None:
        """Stop the VM and undo every mount; remove the sandbox directory unless `remove` is False
        (the state and logs then stay for `pykata ps -a` / `logs` until `pykata rm`).

        Idempotent: concurrent and repeated calls share one teardown and all return when it is done.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._traced_teardown(remove))
        await asyncio.shield(self._stop_task)

    async def _traced_teardown(self, remove: bool) -> None:
        with tracing.span("sandbox.stop", sandbox_id=self.id):
            try:
                await self._teardown(remove)
            except BaseException:
                # cut short: the task cancelled (asyncio.run cancels every task when a second Ctrl-C
                # ends it), a KeyboardInterrupt raised in it, or its coroutine closed with the loop.
                # What must not outlive this process is finished here, without awaiting.
                self.teardown_now(remove)
                raise

    def teardown_now(self, remove: bool = True) -> None:
        """Synchronously end what the sandbox runs on the host (the processes it recorded: QEMU,
        virtiofsd, the 9p helper), undo its mounts and remove its directory (with `remove`; else keep
        the state as stopped): what a teardown cut short by cancellation or KeyboardInterrupt left.
        Network and filter rules are not touched (`pykata cleanup` sweeps the rules). Never raises."""
        try:
            if remove:
                reaper.remove_sandbox_dir(self._link or self.dir, self.record)
            else:
                reaper.end_processes(self.dir, self.record)
                mounts.unmount_all(self.dir)
                self.record.status = "stopped"
                self.record.vmm_pid = None
                for sub in ("shared", "mounts", "overlay", "vm"):
                    shutil.rmtree(self.dir / sub, ignore_errors=True)
                state.save(self.dir, self.record)
        except (OSError, PykataError) as e:
            log.warning("sandbox %s: cleanup after an interrupted stop: %s", self.id, e)
            return
        self._release_reaper()

    def _release_reaper(self) -> None:
        # the loop and a start_reaper thread may both get here: each releases what it took (idempotent)
        taken, self._reaper = self._reaper, None
        if taken is not None:
            taken.release()

    async def _teardown(self, remove: bool) -> None:
        mark("sb.teardown")
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self._root_watch is not None:
            asyncio.get_running_loop().remove_reader(self._root_watch.fd)
            self._root_watch.close()
        if self._proxy is not None:
            with contextlib.suppress(Exception):
                # an exec whose command ended the container still gets its status (the VM runs on)
                await self._proxy.close(grace=PROXY_DRAIN_SECONDS)
        mark("sb.proxy.closed")
        if self.vm is not None:
            try:
                await asyncio.wait_for(self.vm.stop(), STOP_TIMEOUT)
            except Exception as e:  # the VM driver kills what is left; we still clean our part
                log.warning("sandbox %s: VM stop: %s", self.id, e)
        mark("sb.vm.stopped")
        if self._agent is not None:
            await self._agent.close()
        if self.network is not None:
            await detach_network(self.network)
        mark("sb.network.detached")
        if self._holding is not None:  # after the VM ended (QEMU's tap file holds it too)
            self._holding.close()
        if self._egress_uid is not None:  # after the VM ended: its uid never runs unfiltered
            try:
                await egress.remove(self._egress_uid, self.id)
                self._egress_uid = None
            except PykataError as e:
                log.warning("sandbox %s: %s", self.id, e)
        try:
            self.mounts.teardown()
            mounts.unmount_all(self.dir)  # what a failed unmount above left, by the mount table
        except PykataError as e:
            log.warning("sandbox %s: %s", self.id, e)
            if mounts.mounts_under(self.dir):
                return  # never delete below a mount that is still there (a volume's host data)
        mark("sb.mounts.undone")
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._link is not None:
                with contextlib.suppress(OSError):
                    self._link.unlink()
        else:
            self.record.status = "stopped"
            self.record.vmm_pid = None
            for sub in ("shared", "mounts", "overlay", "vm"):
                shutil.rmtree(self.dir / sub, ignore_errors=True)
            with contextlib.suppress(OSError):
                state.save(self.dir, self.record)
        self._release_reaper()  # done: nothing is left for it (a return above keeps it for our exit)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _process_user(process: dict[str, Any]) -> list[int]:
    """[uid, gid, additionalGids...] of an OCI process (what ContainerRecord.user keeps); [] when the
    spec has none a number can be read from."""
    user = process.get("user")
    if not isinstance(user, dict):
        return []
    ids = [user.get("uid", 0), user.get("gid", 0), *(user.get("additionalGids") or [])]
    return [int(i) for i in ids] if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) else []


def _nine_p_cache_options(cache: Virtio9pCache) -> list[str]:
    """The guest's 9p mount options for `hypervisor.qemu.virtio_9p_cache`.

    "mmap" is the client's cache=mmap (a page cache with write-back, which writable MAP_SHARED needs)
    plus `directio`: read() and write() still go to the host for every call (no page cache), as with
    cache=none, so a file the host changes reads anew even on a descriptor the guest keeps open.
    """
    return ["cache=mmap", "directio"] if cache == "mmap" else ["cache=none"]

