"""Sandbox snapshots: a running sandbox saved to a directory (guest memory, devices, the containers'
writable layers, which live in guest RAM) and restored later, in any process, as a new sandbox. The
directory's layout, hashing and opening are pykata.sandbox.snapshotdir's.

The manifest names everything the saved guest depends on: the pykata version, QEMU's version, the
machine (type, memory, vCPUs, CPU model, accelerator, kernel parameters, devices), the kernel,
initrd and image by sha256, the state by size and sha256, and the sandbox's containers. A restore
checks each against this host and refuses a mismatch with an error naming the field.

A snapshot holds guest memory (secrets included): it is as trusted as the user who made it. Still,
restoring one never makes the host open a file the manifest names: the assets are this host's own
(compared by hash), the state is opened inside the snapshot directory without following a symlink,
and QEMU (jailed) only gets a descriptor of it.

Only a sandbox whose guest never mounted the host's shared directory can be saved (one made with
`guest_share=False`, or one whose roots came on image disks and that has no host volume: the guest
mounts the share with the first container that needs it): QEMU 7.2 refuses to migrate a VM with the
9p share mounted, and virtio-fs cannot be migrated at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykata
from pykata.agentapi import Agent
from pykata.config import Config, load_config
from pykata.errors import InvalidArgument, PykataError
from pykata.factory import sync_guest_clock, templated_config
from pykata.factory.template import template_inputs
from pykata.hypervisor.base import Hypervisor, RestoreSource
from pykata.hypervisor.devices import NetDevice
from pykata.hypervisor.errors import RestoreError
from pykata.hypervisor.qemu.driver import QemuHypervisor
from pykata.hypervisor.readiness import MAX_STRETCH
from pykata.network import EgressPolicy, guest_mac, nic_id
from pykata.resources.rootimage import SUFFIX as ROOT_IMAGE_SUFFIX
from pykata.resources.rootimage import RootImageCache
from pykata.resources.rootslots import SlotTable
from pykata.sandbox import state
from pykata.sandbox.process import Process
from pykata.sandbox.proxy import serve_agent_proxy
from pykata.sandbox.snapshotdir import (
    FORMAT,
    KIND,
    MACHINE_KEYS,
    MANIFEST,
    STATE,
    STREAM_SLACK,
    GrowingFileHash,
    KnownDigests,
    Opened,
    SnapshotError,
    open_snapshot,
    path_sha256,
    state_sha256,
    want,
)

__all__ = ["FORMAT", "MANIFEST", "STATE", "Saved", "SnapshotError", "open_snapshot", "restore", "save"]


@dataclass(frozen=True)
class Saved:
    """What save() wrote."""

    path: Path
    state_bytes: int
    seconds: float


# -- hashing -------------------------------------------------------------------------------------------

async def _machine(config: Config) -> tuple[dict[str, Any], dict[str, Path | None]]:
    """The machine a templated VM of `config` is, and its kernel/initrd/image (this host's)."""
    inputs, kernel, initrd, image = await template_inputs(config)
    machine = {k: inputs.get(k) for k in MACHINE_KEYS}
    return machine, {"kernel": kernel, "initrd": initrd, "image": image}


def _assets_json(assets: dict[str, Path | None], known: KnownDigests) -> dict[str, Any]:
    return {name: None if path is None else {"sha256": path_sha256(path, known), "size": path.stat().st_size}
            for name, path in assets.items()}


def _read_ahead(memory: Path | None) -> None:
    """Ask the kernel to read the template's memory file ahead: a clone's RAM maps it privately, and
    the save reads every page the clone never wrote, one fault each if the file's pages were evicted."""
    if memory is None:
        return
    with contextlib.suppress(OSError):
        fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


async def warm_up(config: Config) -> None:
    """Hash this host's kernel/initrd/image now (remembered for the process), so a later save() does
    not. Never raises."""
    with contextlib.suppress(PykataError, OSError):
        _, assets = await _machine(config)
        await asyncio.to_thread(_assets_json, assets, KnownDigests(config.runtime.runtime_path))


def _devices_json(sandbox: Any) -> list[dict[str, Any]]:
    """The image slots that hold a disk, by the disk's content key (pykata.resources.rootimage)."""
    return [{"kind": "root-slot", "slot": slot, "key": key, "containers": sorted(users)}
            for slot, (key, users) in sorted(sandbox.root_slots.holding().items()) if key is not None]


def _container_json(sandbox: Any, cid: str) -> dict[str, Any]:
    c = sandbox.containers[cid]
    rec = sandbox.record.containers.get(cid)
    return {"id": cid, "pid": c.init.pid, "terminal": c.init.terminal, "exec_seq": c._exec_seq,
            "image": rec.image if rec else "", "command": rec.command if rec else []}


async def save(sandbox: Any, path: Path, *, extra: dict[str, Any] | None = None,
               resume: bool = True) -> Saved:
    """Save `sandbox` (a pykata.sandbox.Sandbox) to the new directory `path`. The VM is paused for the
    save and resumed after it when `resume` (else it stays paused: the caller stops it). `extra`
    (JSON) is stored in the manifest for the caller (the SDK keeps its settings there).

    Raises:
        SnapshotError: `path` exists or its parent cannot be made; the sandbox cannot be snapshotted (it
            shares host files with the guest, has a NIC, or booted cold); the save failed. Nothing is
            left at `path` on failure.
    """
    started = time.monotonic()
    vm = sandbox.vm
    if not isinstance(vm, QemuHypervisor) or vm.state != "running":
        raise SnapshotError("", f"sandbox {sandbox.id} has no running VM")
    if sandbox.guest_share and sandbox.share_mounted:
        raise SnapshotError("", f"sandbox {sandbox.id} mounts the host's shared directory in the guest (9p: a "
                                "host volume, or a root not on an image disk), which QEMU cannot migrate: make "
                                "it with guest_share=False (SDK: snapshots=True)")
    if sandbox.network is not None:
        raise SnapshotError("", f"sandbox {sandbox.id} is in a pod network; snapshots of pod-networked "
                                "sandboxes are not supported (only of egress ones)")
    if vm.restore_source is None:
        raise SnapshotError("", f"sandbox {sandbox.id} booted cold; only VMs from a template (factory."
                                "enable_template = true) or a snapshot can be saved")
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        raise SnapshotError("path", f"{path} exists already")
    try:
        os.makedirs(path.parent, mode=0o700, exist_ok=True)  # missing parents are made (0700: yours)
    except OSError as exc:
        raise SnapshotError("path", f"cannot make {path.parent}: {exc.strerror}") from None
    if not path.parent.is_dir():
        raise SnapshotError("path", f"{path.parent} is not a directory")
    machine, assets = await _machine(sandbox.config)
    manifest: dict[str, Any] = {
        "format": FORMAT, "kind": KIND, "pykata_version": str(pykata.__version__), "created_at": time.time(),
        "source_sandbox": sandbox.id, "qemu_version": await vm.qemu_version(), "machine": machine,
        "devices": _devices_json(sandbox),
        "assets": await asyncio.to_thread(_assets_json, assets, KnownDigests(sandbox.config.runtime.runtime_path)),
        "containers": [_container_json(sandbox, cid) for cid in sandbox.containers],
        "extra": extra or {},
    }
    if sandbox.egress is not None:
        # its NIC on the user network, and what the host let it reach (made again for the restore); the
        # stack, since libslirp's state is in QEMU's stream
        manifest["network"] = {"kind": "egress", "policy": sandbox.egress.to_json(),
                               "user_network": sandbox.config.qemu.user_network}
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o700)
    try:
        fd = os.open(tmp / STATE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        _read_ahead(vm.restore_source.memory)
        hasher = GrowingFileHash(fd)
        try:
            try:
                await vm.snapshot(fd)
            finally:
                digest, hashed = await hasher.finish()
                if resume and vm.state == "running":
                    await sandbox.resume_vm()
            written = os.fstat(fd)
            if hashed != written.st_size:
                raise SnapshotError("state", f"{hashed} bytes hashed, {written.st_size} written")
            manifest["state"] = {"size": hashed, "sha256": digest}
            mfd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
            with os.fdopen(mfd, "w") as f:
                json.dump(manifest, f, indent=1)
            # still in the 0700 temporary directory: nobody else can have written the state
            known = KnownDigests(sandbox.config.runtime.runtime_path)
            await known.settle(fd)
            known.put(fd, digest, written)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, path)
        except OSError as exc:
            raise SnapshotError("path", f"cannot create {path}: {exc.strerror}") from None
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, PykataError) and not isinstance(exc, SnapshotError):
            raise SnapshotError("", f"sandbox {sandbox.id}: {exc}") from exc
        raise
    return Saved(path, manifest["state"]["size"], time.monotonic() - started)


def _restore_config(config: Config, m: dict[str, Any]) -> Config:
    """`config` as the saved VM ran: templated, its memory and vCPUs the manifest's (bounded)."""
    machine = m["machine"]
    memory, vcpus = machine.get("default_memory"), machine.get("default_vcpus")
    q = config.qemu
    if not isinstance(memory, int) or isinstance(memory, bool) or not 64 <= memory <= 1 << 20:
        raise SnapshotError("machine.default_memory", f"{str(memory)[:32]} is not a memory size in MiB")
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= 1024:
        raise SnapshotError("machine.default_vcpus", f"{str(vcpus)[:32]} is not a vCPU count")
    if m["state"]["size"] > (memory << 20) + STREAM_SLACK:
        raise SnapshotError("state.size", f"{m['state']['size']} bytes for {memory} MiB of RAM")
    q = dataclasses.replace(q, default_memory=memory, default_vcpus=vcpus)
    return templated_config(dataclasses.replace(config, hypervisor=dataclasses.replace(config.hypervisor, qemu=q)),
                            quiet=True)


async def _check_host(config: Config, m: dict[str, Any]) -> dict[str, Path | None]:
    """Compare the manifest with this host; return this host's kernel/initrd/image."""
    if m["pykata_version"] != str(pykata.__version__):
        raise SnapshotError("pykata_version", f"the snapshot was made by pykata {m['pykata_version'][:64]}, "
                                              f"this is {pykata.__version__}")
    machine, assets = await _machine(config)
    for key in MACHINE_KEYS:
        if m["machine"].get(key) != machine[key]:
            raise SnapshotError(f"machine.{key}", f"the snapshot's is {str(m['machine'].get(key))[:80]!r}, "
                                                  f"this host's is {machine[key]!r}")
    for name in ("kernel", "initrd", "image"):
        saved, here = m["assets"].get(name), assets[name]
        if (saved is None) != (here is None):
            raise SnapshotError(f"assets.{name}", f"the snapshot {'has none' if saved is None else 'has one'}, "
                                                  "this host's guest image differs")
        if here is not None:
            want(saved, f"assets.{name}", dict)
            if not isinstance(saved.get("sha256"), str):
                raise SnapshotError(f"assets.{name}.sha256", "expected a string")
    return assets


def _verify_hashes(m: dict[str, Any], assets: dict[str, Path | None], state_fd: int, known: KnownDigests) -> None:
    """The hashes of this host's assets and of the state against the manifest's (run in a thread while
    the VM starts: a mismatch stops it before anyone uses it). Raises SnapshotError naming the field."""
    for name, here in assets.items():
        if here is not None and m["assets"][name]["sha256"] != path_sha256(here, known):
            raise SnapshotError(f"assets.{name}", f"this host's {here} is not the one the snapshot was "
                                                  "made with (sha256 differs: the guest image was rebuilt)")
    if state_sha256(state_fd, known) != m["state"]["sha256"]:
        raise SnapshotError("state.sha256", "the state file is not the one saved (corrupt or altered)")


async def restore(path: Path, *, config: Config | None = None, name: str = "",
                  serve_proxy: bool = True, boot_timeout: float | None = None,
                  on_opened: Callable[[dict[str, Any]], None] | None = None, die_with_owner: bool = False) -> Any:
    """Restore the snapshot at `path` as a new running sandbox (a pykata.sandbox.Sandbox with a new
    id, its own VM, reseeded: fresh randomness and boot_id, the host's clock). `on_opened` sees the
    checked manifest before a VM starts (the SDK reads its `extra` there). `die_with_owner`: QEMU is
    killed when this process ends (pykata.sandbox.Sandbox.create).

    Raises:
        SnapshotError: the snapshot is malformed or does not match this host (naming the field), or
            its state is corrupt. SandboxError / HypervisorError / AgentError: the VM did not come
            up. Nothing is left behind on failure.
    """
    from pykata.sandbox.sandbox import Container, Sandbox, new_id, sandboxes_dir

    config = config or load_config()
    opened = await asyncio.to_thread(open_snapshot, path)
    try:
        m = opened.manifest
        if on_opened is not None:
            on_opened(m)
        config = _restore_config(config, m)
        assets = await _check_host(config, m)
        sid = new_id()
        sb = Sandbox(sid, config, sandboxes_dir(config) / sid)
        sb.guest_share = False
        sb.egress = _egress(m, config.qemu.user_network)
        sb.record.name = name
        known = KnownDigests(config.runtime.runtime_path)
        verified = asyncio.ensure_future(asyncio.to_thread(_verify_hashes, m, assets, opened.state_fd, known))
        try:
            try:
                await _start(sb, opened, assets, m, boot_timeout or config.qemu.boot_timeout, die_with_owner)
            except Exception as exc:
                # a hash mismatch is the cause whatever the VM did with the wrong bytes
                await asyncio.wait([verified])
                mismatch = None if verified.cancelled() else verified.exception()
                if isinstance(mismatch, SnapshotError):
                    raise mismatch from None
                if isinstance(exc, RestoreError):
                    raise SnapshotError("state", f"QEMU could not load it: {exc}") from None
                raise
            await verified
            agent = sb.agent
            for c in m["containers"]:
                init = Process(agent, c["id"], "", c["pid"], c["terminal"])
                cont = Container(sb, c["id"], init)
                cont._exec_seq = c["exec_seq"]
                sb.containers[c["id"]] = cont
                sb.record.containers[c["id"]] = state.ContainerRecord(
                    id=c["id"], image=c["image"], command=c["command"], created_at=time.time(), status="running")
            if serve_proxy:
                sb._proxy = await serve_agent_proxy(agent, sb.dir / "agent.sock")
            sb.record.status = "running"
            state.save(sb.dir, sb.record)
        except BaseException:
            # the thread reads state_fd: it must be done before the descriptor is closed
            await asyncio.wait([verified])
            with contextlib.suppress(BaseException):
                verified.result()
            await asyncio.shield(sb.stop(remove=True))
            raise
        return sb
    finally:
        opened.close()


def _egress(m: dict[str, Any], user_network: str) -> EgressPolicy | None:
    """The saved sandbox's egress policy, checked again (the manifest is the user's), on this host's
    user-mode network stack (`user_network`). Raises SnapshotError."""
    network = m.get("network")
    if network is None:
        return None
    want(network, "network", dict)
    if network.get("kind") != "egress":
        raise SnapshotError("network.kind", f"{str(network.get('kind'))[:32]!r} is not a network this pykata restores")
    saved = network.get("user_network", "slirp")  # manifests from before the key: libslirp
    if saved != user_network:
        # QEMU saves libslirp's connections in its stream, and a QEMU without it cannot load them
        raise SnapshotError("network.user_network", f"the snapshot's NIC is on {str(saved)[:16]!r}, this host's "
                                                    f"hypervisor.qemu.user_network is {user_network!r}")
    policy = want(network.get("policy"), "network.policy", dict)
    try:
        return EgressPolicy.build(allow=policy.get("allow"), deny=want(policy.get("deny"), "network.policy.deny", list),
                                  dns=want(policy.get("dns"), "network.policy.dns", list))
    except (InvalidArgument, TypeError) as e:
        raise SnapshotError("network.policy", str(e)[:200]) from None


def _root_disks(config: Config, m: dict[str, Any]) -> tuple[tuple[int, Path], ...]:
    """The image disks the saved VM's slots held, found by key in this host's disk cache (never a path
    from the manifest). Raises SnapshotError naming the device."""
    cache = RootImageCache(config.runtime, config.image)
    out = []
    for i, d in enumerate(m["devices"]):
        if d["slot"] >= config.runtime.root_slots:
            raise SnapshotError(f"devices[{i}].slot", f"slot {d['slot']}: this host's VMs have "
                                                      f"{config.runtime.root_slots} (runtime.rootfs_block_slots)")
        path = cache.dir / f"{d['key']}{ROOT_IMAGE_SUFFIX}"
        if not path.is_file() or path.is_symlink():
            raise SnapshotError(f"devices[{i}].key", f"the image disk {d['key']} is not in {cache.dir} (evicted, "
                                                     "or made on another host: run the image once to rebuild it)")
        out.append((d["slot"], path))
    return tuple(out)


async def _start(sb: Any, opened: Opened, assets: dict[str, Path | None], m: dict[str, Any],
                 boot_timeout: float, die_with_owner: bool) -> None:
    from pykata.sandbox.sandbox import VM_DIR, make_sandbox_dir

    make_sandbox_dir(sb.dir)
    state.save(sb.dir, sb.record)
    if die_with_owner:
        await asyncio.to_thread(sb.start_reaper)
    sb.mounts.setup()
    box: dict[str, Agent] = {}

    async def probe(vm: Hypervisor) -> None:
        assert vm.agent_endpoint.socket is not None
        box["agent"] = await Agent.connect(vm.agent_endpoint.socket, sb.id, timeout=boot_timeout * MAX_STRETCH,
                                           request_timeout=sb.config.agent.pykata.request_timeout)

    kernel = assets["kernel"]
    assert kernel is not None
    disks = _root_disks(sb.config, m)
    # QEMU reopens the state through /proc/self/fd: the very file checked above, never a path again
    source = RestoreSource(memory=None, state=Path(f"/proc/{os.getpid()}/fd/{opened.state_fd}"), kernel=kernel,
                           initrd=assets["initrd"], image=assets["image"], root_slots=disks)
    vm = QemuHypervisor(sb.id, sb.config, shared_dir=sb.shared_dir, readiness=probe, vm_dir=sb.dir / VM_DIR,
                        guest_shutdown=sb._guest_shutdown, restore=source, die_with_owner=die_with_owner)
    sb.vm = vm
    if sb.egress is not None:
        # the NIC it was saved with, on a new user network: nothing of the saved host side comes back
        # (QEMU's user network migrates no host sockets or forwards), and the host filter is made
        # again for this QEMU's own uid before it runs
        await vm.add_device(NetDevice(nic_id(0), guest_mac(0), user_net=True))
    await vm.prepare()
    if sb.egress is not None:
        await sb._filter_egress(vm)
    await vm.start()
    version = await vm.qemu_version()
    if version != m["qemu_version"]:
        raise SnapshotError("qemu_version", f"the snapshot was made with QEMU {m['qemu_version'][:32]}, "
                                            f"this host runs {version}")
    sb.record.vmm_pid = vm.pid
    sb.root_slots = SlotTable(vm.root_slots)
    for d in m["devices"]:
        sb.root_slots.occupy(d["slot"], d["key"], set(d["containers"]))
    state.save(sb.dir, sb.record)
    await vm.wait_ready(timeout=boot_timeout)
    sb._agent = box["agent"]
    # independent: the clock and the reseed go to the agent together
    await asyncio.gather(sync_guest_clock(sb.agent), sb._reseed_clone())
