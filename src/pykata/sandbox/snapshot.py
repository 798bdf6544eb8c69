"""Sandbox snapshots: a running sandbox saved to a directory (guest memory, devices, the containers'
writable layers, which live in guest RAM) and restored later, in any process, as a new sandbox.

    <snapshot>/                 0700, made under a temporary name and renamed when complete
      manifest.json             0600: what the snapshot needs (format FORMAT, checked on restore)
      state                     0600: QEMU's migration stream, RAM included

The manifest names everything the saved guest depends on: the pykata version, QEMU's version, the
machine (type, memory, vCPUs, CPU model, accelerator, kernel parameters, devices), the kernel,
initrd and image by sha256, the state by size and sha256, and the sandbox's containers. A restore
checks each against this host and refuses a mismatch with an error naming the field.

A snapshot holds guest memory (secrets included): it is as trusted as the user who made it. Still,
restoring one never makes the host open a file the manifest names: the assets are this host's own
(compared by hash), the state is opened inside the snapshot directory without following a symlink,
and QEMU (jailed) only gets a descriptor of it.

Only a sandbox made with `guest_share=False` can be saved: QEMU 7.2 refuses to migrate a VM with the
9p share mounted, and virtio-fs cannot be migrated at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykata
from pykata import ids
from pykata.agentapi import Agent
from pykata.config import Config, load_config
from pykata.errors import PykataError
from pykata.factory import sync_guest_clock, templated_config
from pykata.factory.template import template_inputs
from pykata.hypervisor.base import Hypervisor, RestoreSource
from pykata.hypervisor.errors import RestoreError
from pykata.hypervisor.qemu.driver import QemuHypervisor
from pykata.resources.rootimage import SUFFIX as ROOT_IMAGE_SUFFIX
from pykata.resources.rootimage import RootImageCache
from pykata.resources.rootslots import SlotTable
from pykata.sandbox import state
from pykata.sandbox.process import Process
from pykata.sandbox.proxy import serve_agent_proxy

FORMAT = 1
KIND = "pykata-sandbox-snapshot"
MANIFEST = "manifest.json"
STATE = "state"
MAX_MANIFEST = 1 << 20
MAX_CONTAINERS = 64
# the stream carries at most the guest's RAM, plus device state and page headers
STREAM_SLACK = 64 << 20
HASH_CHUNK = 4 << 20
# what must be equal between the saved machine and the one restoring it (template_inputs' keys)
MACHINE_KEYS = ("machine_type", "default_memory", "default_vcpus", "maxvcpus", "memory_slots", "maxmemory",
                "cpu_model", "accel", "kernel_params", "entropy_source", "shared_fs", "agent_channel",
                "root_slots", "root_slot_mib")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")  # pykata.resources.rootimage keys (no '.', no '/')


class SnapshotError(PykataError):
    """A snapshot cannot be made or restored; `field` names the manifest field (or file) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"snapshot: {field}: {message}" if field else f"snapshot: {message}")
        self.field = field


@dataclass(frozen=True)
class Saved:
    """What save() wrote."""

    path: Path
    state_bytes: int
    seconds: float


# -- hashing -------------------------------------------------------------------------------------------

_digests: dict[tuple[int, int, int, int], str] = {}


def file_sha256(fd: int) -> str:
    """sha256 of an open file, remembered per (device, inode, size, mtime) for this process."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _digests:
        return _digests[key]
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, HASH_CHUNK, offset)
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    _digests[key] = h.hexdigest()
    return _digests[key]


class GrowingFileHash:
    """sha256 of a file another process appends to (QEMU writing the stream), computed in a thread
    while it grows, so hashing overlaps the save instead of following it: `finish()` once the writer
    is done returns the digest and the size."""

    def __init__(self, fd: int) -> None:
        import threading

        self._fd = fd
        self._done = threading.Event()
        self._hash = hashlib.sha256()
        self._offset = 0
        self._thread = threading.Thread(target=self._run, name="snapshot-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            finished = self._done.is_set()  # read before the last pass: nothing is written after it
            chunk = os.pread(self._fd, HASH_CHUNK, self._offset)
            if chunk:
                self._hash.update(chunk)
                self._offset += len(chunk)
            elif finished:
                return
            else:
                self._done.wait(0.002)

    async def finish(self) -> tuple[str, int]:
        self._done.set()
        await asyncio.to_thread(self._thread.join)
        return self._hash.hexdigest(), self._offset


def path_sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return file_sha256(fd)
    finally:
        os.close(fd)


# -- the manifest ------------------------------------------------------------------------------------


async def _machine(config: Config) -> tuple[dict[str, Any], dict[str, Path | None]]:
    """The machine a templated VM of `config` is, and its kernel/initrd/image (this host's)."""
    inputs, kernel, initrd, image = await template_inputs(config)
    machine = {k: inputs.get(k) for k in MACHINE_KEYS}
    return machine, {"kernel": kernel, "initrd": initrd, "image": image}


def _assets_json(assets: dict[str, Path | None]) -> dict[str, Any]:
    return {name: None if path is None else {"sha256": path_sha256(path), "size": path.stat().st_size}
            for name, path in assets.items()}


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
        SnapshotError: `path` exists or its parent does not; the sandbox cannot be snapshotted (it
            shares host files with the guest, has a NIC, or booted cold); the save failed. Nothing is
            left at `path` on failure.
    """
    started = time.monotonic()
    vm = sandbox.vm
    if not isinstance(vm, QemuHypervisor) or vm.state != "running":
        raise SnapshotError("", f"sandbox {sandbox.id} has no running VM")
    if sandbox.guest_share:
        raise SnapshotError("", f"sandbox {sandbox.id} mounts the host's shared directory in the guest (9p), "
                                "which QEMU cannot migrate: make it with guest_share=False (SDK: snapshots=True)")
    if sandbox.network is not None:
        raise SnapshotError("", f"sandbox {sandbox.id} has a network interface; snapshots of networked "
                                "sandboxes are not supported")
    if vm.restore_source is None:
        raise SnapshotError("", f"sandbox {sandbox.id} booted cold; only VMs from a template (factory."
                                "enable_template = true) or a snapshot can be saved")
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        raise SnapshotError("path", f"{path} exists already")
    if not path.parent.is_dir():
        raise SnapshotError("path", f"{path.parent} is not a directory")
    machine, assets = await _machine(sandbox.config)
    manifest: dict[str, Any] = {
        "format": FORMAT, "kind": KIND, "pykata_version": str(pykata.__version__), "created_at": time.time(),
        "source_sandbox": sandbox.id, "qemu_version": await vm.qemu_version(), "machine": machine,
        "devices": _devices_json(sandbox),
        "assets": await asyncio.to_thread(_assets_json, assets),
        "containers": [_container_json(sandbox, cid) for cid in sandbox.containers],
        "extra": extra or {},
    }
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o700)
    try:
        fd = os.open(tmp / STATE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        hasher = GrowingFileHash(fd)
        try:
            try:
                await vm.snapshot(fd)
            finally:
                digest, hashed = await hasher.finish()
                if resume and vm.state == "running":
                    await sandbox.resume_vm()
            if hashed != os.fstat(fd).st_size:
                raise SnapshotError("state", f"{hashed} bytes hashed, {os.fstat(fd).st_size} written")
            manifest["state"] = {"size": hashed, "sha256": digest}
        finally:
            os.close(fd)
        mfd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(mfd, "w") as f:
            json.dump(manifest, f, indent=1)
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


@dataclass
class Opened:
    """A snapshot directory opened for a restore: its checked manifest and the state's descriptor."""

    path: Path
    manifest: dict[str, Any]
    state_fd: int

    def close(self) -> None:
        if self.state_fd >= 0:
            os.close(self.state_fd)
            self.state_fd = -1


def _open_in(dir_fd: int, name: str, what: str) -> int:
    """Open `name` in the snapshot directory: a regular file, never through a symlink."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        why = "is a symlink (not followed)" if exc.errno == errno.ELOOP else exc.strerror
        raise SnapshotError(what, f"{name}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(what, f"{name} is not a regular file")
    return fd


def _want(data: Any, field: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(data, kind) or (isinstance(data, bool) and kind in (int, float)):
        raise SnapshotError(field, f"expected {getattr(kind, '__name__', kind)}, got {type(data).__name__}")
    return data


def _check_manifest(data: Any) -> dict[str, Any]:
    """Shape and bounds of a parsed manifest (values against this host come later)."""
    m: dict[str, Any] = _want(data, "manifest", dict)
    if m.get("kind") != KIND:
        raise SnapshotError("kind", f"{str(m.get('kind'))[:64]!r} is not a pykata sandbox snapshot")
    if m.get("format") != FORMAT:
        raise SnapshotError("format", f"{str(m.get('format'))[:32]} (this pykata reads format {FORMAT})")
    for key in ("pykata_version", "qemu_version", "source_sandbox"):
        _want(m.get(key), key, str)
    for key in ("machine", "assets", "state", "extra"):
        _want(m.get(key), key, dict)
    devices = _want(m.get("devices"), "devices", list)
    if len(devices) > 64:
        raise SnapshotError("devices", f"{len(devices)} devices")
    for i, d in enumerate(devices):
        f = f"devices[{i}]"
        _want(d, f, dict)
        if d.get("kind") != "root-slot":
            raise SnapshotError(f"{f}.kind", f"{str(d.get('kind'))[:32]!r} is not a device this pykata restores")
        if not 0 <= _want(d.get("slot"), f"{f}.slot", int) < 64:
            raise SnapshotError(f"{f}.slot", "out of range")
        if not KEY_RE.match(_want(d.get("key"), f"{f}.key", str)):
            raise SnapshotError(f"{f}.key", "not an image disk key")
        users = _want(d.get("containers"), f"{f}.containers", list)
        if len(users) > MAX_CONTAINERS or not all(isinstance(u, str) for u in users):
            raise SnapshotError(f"{f}.containers", "expected container ids")
    st = m["state"]
    _want(st.get("size"), "state.size", int)
    if not isinstance(st.get("sha256"), str) or len(st["sha256"]) != 64:
        raise SnapshotError("state.sha256", "expected 64 hex digits")
    containers = _want(m.get("containers"), "containers", list)
    if not 1 <= len(containers) <= MAX_CONTAINERS:
        raise SnapshotError("containers", f"{len(containers)} containers (1-{MAX_CONTAINERS})")
    for i, c in enumerate(containers):
        f = f"containers[{i}]"
        _want(c, f, dict)
        try:
            ids.check_container_id(_want(c.get("id"), f"{f}.id", str))
        except PykataError as e:
            raise SnapshotError(f"{f}.id", str(e)) from None
        if not 0 < _want(c.get("pid"), f"{f}.pid", int) < 1 << 22:
            raise SnapshotError(f"{f}.pid", "out of range")
        if not 0 <= _want(c.get("exec_seq"), f"{f}.exec_seq", int) < 1 << 40:
            raise SnapshotError(f"{f}.exec_seq", "out of range")
        _want(c.get("terminal"), f"{f}.terminal", bool)
        if len(_want(c.get("image"), f"{f}.image", str)) > 4096:
            raise SnapshotError(f"{f}.image", "too long")
        cmd = _want(c.get("command"), f"{f}.command", list)
        if len(cmd) > 4096 or not all(isinstance(a, str) for a in cmd):
            raise SnapshotError(f"{f}.command", "expected a list of strings")
    return m


def open_snapshot(path: Path) -> Opened:
    """Open and check the snapshot at `path` (no VM yet).

    Raises:
        SnapshotError: not a snapshot directory, a symlink, an unreadable, oversized or malformed
            manifest, a state of the wrong size; the error names the field.
    """
    path = Path(os.path.abspath(path))
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # O_DIRECTORY|O_NOFOLLOW on a symlink fails with ENOTDIR
        why = "is a symlink (not followed)" if os.path.islink(path) else exc.strerror
        raise SnapshotError("path", f"{path}: {why}") from None
    try:
        mfd = _open_in(dir_fd, MANIFEST, "manifest")
        try:
            if os.fstat(mfd).st_size > MAX_MANIFEST:
                raise SnapshotError("manifest", f"larger than {MAX_MANIFEST} bytes")
            raw = os.read(mfd, MAX_MANIFEST + 1)
        finally:
            os.close(mfd)
        try:
            manifest = _check_manifest(json.loads(raw))
        except (ValueError, RecursionError) as exc:
            raise SnapshotError("manifest", f"not valid JSON: {str(exc)[:200]}") from None
        sfd = _open_in(dir_fd, STATE, "state")
    finally:
        os.close(dir_fd)
    size = os.fstat(sfd).st_size
    want = manifest["state"]["size"]
    if size != want:
        os.close(sfd)
        raise SnapshotError("state.size", f"the state file has {size} bytes, the manifest says {want} "
                                          "(truncated or not this snapshot's)")
    return Opened(path, manifest, sfd)


def _restore_config(config: Config, m: dict[str, Any]) -> Config:
    """`config` as the saved VM ran: templated, its memory and vCPUs the manifest's (bounded)."""
    import dataclasses

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
            _want(saved, f"assets.{name}", dict)
            if not isinstance(saved.get("sha256"), str):
                raise SnapshotError(f"assets.{name}.sha256", "expected a string")
    return assets


def _verify_hashes(m: dict[str, Any], assets: dict[str, Path | None], state_fd: int) -> None:
    """The hashes of this host's assets and of the state against the manifest's (run in a thread while
    the VM starts: a mismatch stops it before anyone uses it). Raises SnapshotError naming the field."""
    for name, here in assets.items():
        if here is not None and m["assets"][name]["sha256"] != path_sha256(here):
            raise SnapshotError(f"assets.{name}", f"this host's {here} is not the one the snapshot was "
                                                  "made with (sha256 differs: the guest image was rebuilt)")
    if file_sha256(state_fd) != m["state"]["sha256"]:
        raise SnapshotError("state.sha256", "the state file is not the one saved (corrupt or altered)")


async def restore(path: Path, *, config: Config | None = None, name: str = "",
                  serve_proxy: bool = True, boot_timeout: float | None = None,
                  on_opened: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Restore the snapshot at `path` as a new running sandbox (a pykata.sandbox.Sandbox with a new
    id, its own VM, reseeded: fresh randomness and boot_id, the host's clock). `on_opened` sees the
    checked manifest before a VM starts (the SDK reads its `extra` there).

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
        sb.record.name = name
        verified = asyncio.ensure_future(asyncio.to_thread(_verify_hashes, m, assets, opened.state_fd))
        try:
            try:
                await _start(sb, opened, assets, m, boot_timeout or config.qemu.boot_timeout)
            except RestoreError as exc:
                await verified  # a hash mismatch says more than QEMU's refusal
                raise SnapshotError("state", f"QEMU could not load it: {exc}") from None
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
                 boot_timeout: float) -> None:
    from pykata.sandbox.sandbox import make_sandbox_dir

    make_sandbox_dir(sb.dir)
    state.save(sb.dir, sb.record)
    sb.mounts.setup()
    box: dict[str, Agent] = {}

    async def probe(vm: Hypervisor) -> None:
        assert vm.agent_endpoint.socket is not None
        box["agent"] = await Agent.connect(vm.agent_endpoint.socket, sb.id, timeout=boot_timeout,
                                           request_timeout=sb.config.agent.pykata.request_timeout)

    kernel = assets["kernel"]
    assert kernel is not None
    disks = _root_disks(sb.config, m)
    # QEMU reopens the state through /proc/self/fd: the very file checked above, never a path again
    source = RestoreSource(memory=None, state=Path(f"/proc/{os.getpid()}/fd/{opened.state_fd}"), kernel=kernel,
                           initrd=assets["initrd"], image=assets["image"], root_slots=disks)
    vm = QemuHypervisor(sb.id, sb.config, shared_dir=sb.shared_dir, readiness=probe, vm_dir=sb.dir / "vm",
                        guest_shutdown=sb._guest_shutdown, restore=source)
    sb.vm = vm
    await vm.prepare()
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
