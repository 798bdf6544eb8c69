"""VM templates (Kata's "factory"): boot a guest once, save it, and start later VMs from the save.

    template = await ensure_template(config)          # made once, then found in the cache
    vm = QemuHypervisor("sb1", templated_config(config), shared_dir=d, readiness=probe,
                        restore=template.restore_source)
    await vm.prepare(); await vm.start(); await vm.wait_ready()           # restored, not booted

(pykata.factory.start_vm decides whether a VM starts from a template and does the above.)

A template is a directory <factory.template_path>/<key>/ holding `memory` (guest RAM: the template
VM ran with it as a shared file-backed memory), `state` (QEMU's device state, written by a migration
with x-ignore-shared, so without RAM) and `template.json`. The key hashes everything the saved guest
depends on: QEMU binary, kernel, initrd/image (path, size, mtime), machine type, vCPUs, memory, CPU
model, accelerator, kernel parameters. A clone runs QEMU with the same command line except
`share=off` (a private copy-on-write mapping of `memory`), its own sockets, logs and 9p directory, and
`-incoming defer`; it loads `state` and continues where the template stopped: its agent waiting for
a host connection.

What a clone inherits and the host must fix:
  * the guest wall clock is the template's: set it through the agent (`sync_guest_clock`).
  * the kernel's random state is the template's. The template is saved ready by its console line,
    before any host talked to its agent, so a clone's host starts the agent's first session, and
    the agent makes the kernel reseed its CRNG with that session's first bytes (RDSEED/RDRAND and
    the input pool, which differ per clone), before it reads a request (pykata.agent.entropy). Linux
    from 6.2 reseeds only on a timer, so nothing else would make two clones differ for seconds.
    Sandboxes also reseed with the host's bytes (ReseedRandomDev). Processes that were already
    running in the template (the agent's Python) keep their user-space PRNG state (Python's
    `random`, hash seed); the agent does not use them for secrets.

Templates use 9p for the shared directory (QEMU 7.2 cannot migrate vhost-user-fs) and a
virtio-serial agent channel; the guest must not have mounted the 9p share when it is saved (QEMU
refuses to migrate a mounted 9p export), which holds because the agent mounts it at CreateSandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.agentapi import Agent
from pykata.config.schema import Config
from pykata.errors import HypervisorError, NotFound
from pykata.fsutil import async_file_lock, file_lock
from pykata.hypervisor.accel import resolve_accelerator
from pykata.hypervisor.base import Hypervisor, RestoreSource
from pykata.hypervisor.devices import NetDevice
from pykata.hypervisor.qemu.assets import resolve_assets
from pykata.hypervisor.qemu.driver import QemuHypervisor
from pykata.hypervisor.qemu.launch import default_cpu_model
from pykata.hypervisor.readiness import (
    MAX_STRETCH,
    SETTLED_MARKER,
    BootDeadline,
    Starvation,
    breakdown_since,
    busy_breakdown,
    thread_cpu_seconds,
    wait_for_console_line,
    wait_quiet,
)
from pykata.network.tap import guest_mac, nic_id, open_tap

# The backend of a user-mode network NIC in a template's key, by hypervisor.qemu.user_network: libslirp
# ("user", the key templates had before) or a stream to passt.
USER_NET_BACKENDS = {"slirp": "user", "passt": "stream"}

log = logging.getLogger("pykata.factory")

FORMAT = 1
META = "template.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
LOCK_POLL = 0.05
# `pykata factory init` (and `destroy --stale`) remove templates no VM has used for this long: each one
# holds its guest's RAM in template_path (under /run, on most hosts a tmpfs: host memory), and a node whose
# configuration or guest image changed keeps making new ones.
UNUSED_SECONDS = 3600.0
# How long a template VM may take to idle before it is saved (it took 0.5-1.5 s after its agent's
# console line here under TCG; a busy host's waits count as busy).
TEMPLATE_SETTLE_LIMIT = 10.0

_switch_logged = False


@dataclass(frozen=True)
class Template:
    """One saved template on disk."""

    dir: Path
    key: str
    inputs: dict[str, Any]
    kernel: Path
    initrd: Path | None
    image: Path | None
    created_at: float
    build_seconds: float

    @property
    def memory(self) -> Path:
        return self.dir / "memory"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def restore_source(self) -> RestoreSource:
        """What a VM started from this template is handed (the driver needs nothing else of it)."""
        return RestoreSource(memory=self.memory, state=self.state, kernel=self.kernel, initrd=self.initrd,
                             image=self.image)

    def check_fits(self, config: Config, nics: int = 0, *, user_net: bool = False) -> None:
        """Check that a VM of `config` with `nics` NICs (on the user-mode network with `user_net`) can be
        cloned from this template.

        Raises:
            HypervisorError: memory, vCPUs, NICs, machine or CPU model differ, or an asset changed on disk.
        """
        q = templated_config(config, quiet=True).qemu
        want = {"machine_type": q.machine_type, "default_memory": q.default_memory,
                "default_vcpus": q.default_vcpus, "cpu_model": q.cpu_model, "path": q.path,
                "nics": nics or None, "nic_backend": USER_NET_BACKENDS[q.user_network] if user_net else None,
                "balloon": _balloon_inputs(config)}
        for key, value in want.items():
            if self.inputs.get(key) != value:
                raise HypervisorError(f"template {self.key}: hypervisor.qemu.{key} is {value!r}, the template "
                                      f"was made with {self.inputs.get(key)!r}")
        for name, path in (("kernel", self.kernel), ("initrd", self.initrd), ("image", self.image)):
            if path is not None and _file_id(path) != self.inputs.get(name):
                raise HypervisorError(f"template {self.key}: the {name} {path} changed since the template "
                                      f"was made (run `pykata factory destroy {self.key}`)")

    def to_json(self) -> dict[str, Any]:
        size = self.memory.stat().st_blocks * 512 if self.memory.exists() else 0
        return {"key": self.key, "dir": str(self.dir), "created_at": self.created_at,
                "build_seconds": round(self.build_seconds, 3), "kernel": str(self.kernel),
                "initrd": str(self.initrd) if self.initrd else None,
                "image": str(self.image) if self.image else None,
                "memory_mib": self.inputs.get("default_memory"), "vcpus": self.inputs.get("default_vcpus"),
                "nics": self.inputs.get("nics", 0),
                "memory_on_disk_bytes": size,
                "state_bytes": self.state.stat().st_size if self.state.exists() else 0}


def templated_config(config: Config, *, quiet: bool = False) -> Config:
    """`config` as a templated VM runs it: 9p instead of virtio-fs, a virtio-serial agent channel.

    virtio-fs (vhost-user-fs) cannot be migrated by QEMU 7.2 and a vsock CID is per VM, so a
    template cannot carry either. Logged once per process.
    """
    global _switch_logged
    q = config.qemu
    changes: dict[str, Any] = {}
    if q.shared_fs == "virtio-fs":
        changes["shared_fs"] = "virtio-9p"
    if q.agent_channel != "virtio-serial":
        changes["agent_channel"] = "virtio-serial"
    if not changes:
        return config
    if not quiet and not _switch_logged:
        _switch_logged = True
        log.info("factory.enable_template: templated VMs use %s (QEMU cannot migrate virtio-fs; "
                 "a vsock CID is per VM)", ", ".join(f"{k} = {v}" for k, v in changes.items()))
    return dataclasses.replace(config, hypervisor=dataclasses.replace(
        config.hypervisor, qemu=dataclasses.replace(q, **changes)))


def _file_id(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


async def template_inputs(config: Config, nics: int = 0, *,
                          user_net: bool = False) -> tuple[dict[str, Any], Path, Path | None, Path | None]:
    """What a template for `config` with `nics` NICs (on taps, or with `user_net` on QEMU's user network:
    a tap's saved NIC cannot be restored onto it) depends on, and the kernel/initrd/image it boots.

    Raises:
        HypervisorError: no kernel/root filesystem, or the accelerator cannot be decided.
    """
    config = templated_config(config, quiet=True)
    q = config.qemu
    kernel, initrd, image = resolve_assets(config, None, None, None)
    verdict = await resolve_accelerator(q, kernel, config.runtime.cache_path)
    inputs: dict[str, Any] = {
        "format": FORMAT, "path": q.path, "qemu": _file_id(Path(q.path)),
        "kernel": _file_id(kernel), "initrd": _file_id(initrd) if initrd else None,
        "image": _file_id(image) if image else None, "machine_type": q.machine_type,
        "default_memory": q.default_memory, "default_vcpus": q.default_vcpus,
        "maxvcpus": q.resolved_maxvcpus(), "memory_slots": q.memory_slots, "cpu_model": q.cpu_model,
        "accel": verdict.accel, "kernel_params": q.kernel_params, "enable_debug": q.enable_debug,
        "entropy_source": q.entropy_source, "shared_fs": q.shared_fs, "agent_channel": q.agent_channel,
        # what -cpu the VM got: pykata's default may change between versions
        "cpu": q.cpu_model or default_cpu_model(verdict.accel),
    }
    if q.machine_type == "q35":
        inputs["maxmemory"] = q.resolved_maxmemory()
    if q.balloon_memory():
        # the balloon is part of the saved device set, and the guest booted with its ceiling
        inputs["balloon"] = _balloon_inputs(config)
    if nics:
        # only when there are NICs, so templates without any keep their keys
        inputs["nics"] = nics
        if user_net:
            inputs["nic_backend"] = USER_NET_BACKENDS[q.user_network]
    if config.runtime.root_slots:
        # the image slots are devices: a clone must have the ones its template was saved with
        inputs["root_slots"] = config.runtime.root_slots
        inputs["root_slot_mib"] = config.runtime.rootfs_block_max_mib
    if config.runtime.data_disk_mib:
        # a device too: templates made before it (or with another size) must not be restored
        inputs["data_disk_mib"] = config.runtime.data_disk_mib
    return inputs, kernel, initrd, image


def _balloon_inputs(config: Config) -> dict[str, Any] | None:
    q = config.qemu
    if not q.balloon_memory():
        return None
    return {"ceiling": q.balloon_memory(), "free_page_reporting": q.free_page_reporting}


def key_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def template_root(config: Config) -> Path:
    return Path(config.factory.template_path)


def load_template(directory: Path) -> Template | None:
    """The template saved in `directory`, or None when it is missing or incomplete (never raises)."""
    try:
        meta = json.loads((directory / META).read_text())
        if meta.get("format") != FORMAT:
            return None
        t = Template(dir=directory, key=meta["key"], inputs=meta["inputs"], kernel=Path(meta["kernel"]),
                     initrd=Path(meta["initrd"]) if meta.get("initrd") else None,
                     image=Path(meta["image"]) if meta.get("image") else None,
                     created_at=float(meta["created_at"]), build_seconds=float(meta["build_seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (t.memory.is_file() and t.state.is_file()):
        return None
    return t


def list_templates(config: Config) -> list[Template]:
    """Every complete template under factory.template_path (never raises)."""
    root = template_root(config)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            t = load_template(entry)
            if t is not None:
                found.append(t)
    return found


async def find_template(config: Config, nics: int = 0) -> Template | None:
    """The template `config` (with `nics` NICs) would use, if it is made already.

    Raises:
        HypervisorError: the guest assets cannot be resolved.
    """
    inputs, *_ = await template_inputs(config, nics)
    t = load_template(template_root(config) / key_of(inputs))
    return t if t is not None and t.inputs == inputs else None


@contextlib.asynccontextmanager
async def _locked(root: Path, timeout: float) -> Any:
    """Hold an exclusive flock on <root>/.lock (other processes making templates wait)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(async_file_lock(root / LOCK, timeout=timeout, poll=LOCK_POLL))
        except TimeoutError:
            raise HypervisorError(f"factory: {root / LOCK} is held by another process for "
                                  f"over {timeout:.0f}s") from None
        yield


# Who hears that a template is being made when the caller passed no `progress`: `pykata run` sets it for its
# own task, as the first run after a guest image or size change waits 10-30 s for that, silent otherwise
# (asyncio tasks inherit it; a shim or the SDK set nothing and stay quiet).
TEMPLATE_PROGRESS: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "template_progress", default=None)


async def ensure_template(config: Config, *, nics: int = 0, progress: Callable[[str], None] | None = None,
                          force: bool = False, user_net: bool = False) -> Template:
    """The template for `config` with `nics` NICs (pykata.network.nic_id/guest_mac): found in the
    cache, else made now (once, whoever asks at the same time; atomically: a template directory is
    complete or absent). `force` remakes it.

    Raises:
        HypervisorError: the template VM failed to boot or to save; nothing is left behind.
    """
    config = templated_config(config)
    inputs, kernel, initrd, image = await template_inputs(config, nics, user_net=user_net)
    key = key_of(inputs)
    root = template_root(config)
    final = root / key
    if not force:
        found = load_template(final)
        if found is not None and found.inputs == inputs:
            mark_used(found)
            return found
    say = progress or TEMPLATE_PROGRESS.get() or (lambda _msg: None)
    async with _locked(root, timeout=MAX_STRETCH * config.qemu.boot_timeout + 60):
        found = load_template(final)
        if found is not None and found.inputs == inputs and not force:
            mark_used(found)
            return found  # made by another process while this one waited for the lock
        _prune(root, keep=key, everything=force)
        tmp = root / f"{TMP_PREFIX}{key}-{secrets.token_hex(3)}"
        tmp.mkdir(mode=0o700)
        try:
            say(f"factory: making template {key} (boots a VM once, a few seconds)")
            started = time.monotonic()
            await _make(config, tmp, key, nics, user_net=user_net)
            meta = {"format": FORMAT, "key": key, "inputs": inputs, "kernel": str(kernel),
                    "initrd": str(initrd) if initrd else None, "image": str(image) if image else None,
                    "created_at": time.time(), "build_seconds": time.monotonic() - started}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        made = load_template(final)
        if made is None:
            raise HypervisorError(f"factory: template {final} is incomplete right after it was made")
        say(f"factory: template {key} ready in {made.build_seconds:.1f}s")
        return made


async def _make(config: Config, directory: Path, key: str, nics: int = 0, *, user_net: bool = False) -> None:
    """Boot the template VM with RAM in <directory>/memory, wait for its agent, save, kill it.

    Its NICs sit on throwaway taps in the host's namespace, down and unconnected (a clone gets the
    same NICs on its own taps): they vanish with their fds when QEMU ends. With `user_net` they are on
    QEMU's user network, or with user_network = "passt" on a stream whose connection pykata only holds
    (no network stack runs for the template); the guest configures no address before it is saved, so
    it sends nothing; a clone gets its own user network and its host filter before it runs.
    """
    shared = directory / "shared"
    shared.mkdir()
    # die_with_owner: a maker killed mid-way (Ctrl-C twice, a timeout's SIGKILL) must not leave the
    # template's QEMU running with no one to stop it (one ran orphaned for 33 minutes here).
    vm = QemuHypervisor(f"template-{key[:8]}-{secrets.token_hex(3)}", config, shared_dir=shared,
                        memory_file=directory / "memory", die_with_owner=True)
    taps: list[int] = []
    try:
        for i in range(nics):
            if user_net:
                await vm.add_device(NetDevice(nic_id(i), guest_mac(i), user_net=True))
                continue
            taps.append(open_tap(f"pktpl{secrets.token_hex(4)}"))
            await vm.add_device(NetDevice(nic_id(i), guest_mac(i), tap_fd=taps[-1]))
        await vm.prepare()
        await vm.start()
        for fd in taps:
            os.close(fd)
        taps.clear()
        # Ready by its console line, not by a host's session: the saved agent never had a host's bytes,
        # so a clone's host is its first session, whose first bytes make it reseed the kernel's CRNG
        # before it answers anything (pykata.agent.entropy).
        await vm.wait_ready()
        # Saved with a host connected that sent nothing, once the guest idles: its agent waits in that
        # session for a first byte, and the kernel's work after boot is done, so a clone whose host is
        # connected before the load (QemuHypervisor.take_agent_connection) runs only what answers it.
        host = await _connect_host(vm)
        try:
            assert vm.pid is not None
            began = time.monotonic()
            why = await _settle(vm, vm.pid)
            await vm.save(directory / "state")
            # Told after the save, by what the saved guest had printed: the agent may settle between the
            # look and the save (it did in the second an earlier version spent measuring QEMU's CPU:
            # the log said "had not finished" of a template that held the work done, and its clones,
            # which have nothing left to do, print no SETTLED line)
            if why is not None and SETTLED_MARKER in _console_tail(vm.console_log):
                log.info("factory: template %s: its agent settled as it was saved, %.1fs after its line (%s)",
                         key[:12], time.monotonic() - began, why.split(";", 1)[0])
            elif why is not None:
                log.warning("factory: template %s: saved %.1fs after its agent's line although %s", key[:12],
                            time.monotonic() - began, why)
            else:
                log.info("factory: template %s: the guest idled %.2fs after its agent's line", key[:12],
                         time.monotonic() - began)
        finally:
            if host is not None:
                host.close()
    finally:
        for fd in taps:
            os.close(fd)
        await vm.stop()
        shutil.rmtree(shared, ignore_errors=True)


async def _settle(vm: QemuHypervisor, pid: int) -> str | None:
    """Wait until the template's guest has done its start-up work and idles: None, or why it is to be
    saved anyway (for the log). Bounded by TEMPLATE_SETTLE_LIMIT, not counting the time QEMU waited for
    a host CPU (BootDeadline), and by MAX_STRETCH times that in all.

    Two things, in order: the agent's SETTLED_MARKER, printed once the work it starts after its ready
    line is done (compiling containerd's default seccomp profile in a throwaway container, at nice 19:
    under TCG ~1-3 CPU-s, the larger part of what kept a template's guest busy); then QEMU quiet
    (wait_quiet). A template saved before the marker still runs that work in every clone, from where it
    was, beside the pod's first requests (or, saved before the work began, each clone skips it: its
    host speaks first, pykata.agent.main); one saved busy otherwise makes each clone redo the rest."""
    deadline = BootDeadline(TEMPLATE_SETTLE_LIMIT, Starvation(pid))
    cpu_before, looked = thread_cpu_seconds(pid), time.monotonic()
    agent_done = asyncio.ensure_future(wait_for_console_line(vm.console_log, SETTLED_MARKER))
    try:
        while not agent_done.done() and deadline.remaining() > 0:
            await asyncio.wait({agent_done}, timeout=min(0.25, max(0.01, deadline.remaining())))
    finally:
        agent_done.cancel()
    if not agent_done.done() or agent_done.cancelled():
        return (f"its agent had not finished its start-up work (containerd's seccomp profile, compiled ahead "
                f"at nice 19) after {deadline.elapsed():.1f}s, {deadline.starved:.1f}s of them waiting for a "
                f"host CPU; {breakdown_since(pid, cpu_before, time.monotonic() - looked)}: each clone "
                f"finishes that work itself, or skips it "
                f"when its host speaks first and then compiles the profile for its first container that asks")
    if await wait_quiet(pid, limit=max(1.0, deadline.remaining())) is not None:
        return None
    return (f"the guest did not idle ({await busy_breakdown(pid)}; {deadline.starved:.1f}s waiting for a host "
            f"CPU): each clone goes on with what it was doing")


def _console_tail(path: Path, size: int = 64 << 10) -> bytes:
    """The last `size` bytes of a VM's console log (b"" when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read(size)
    except OSError:
        return b""


async def _connect_host(vm: QemuHypervisor) -> socket.socket | None:
    """A host connection to the agent's port that sends nothing (see _make); None when the port is
    not a unix socket or refuses (the template then works as one saved without a host)."""
    path = vm.agent_endpoint.socket
    if path is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
    except OSError as exc:
        sock.close()
        log.info("factory: template VM %s: no host connection to its agent (%s)", vm.vm_id, exc)
        return None
    return sock


def _prune(root: Path, keep: str | None, everything: bool = False) -> list[str]:
    """Remove unfinished template directories and templates whose assets changed (all of them but
    `keep` when `everything`); return the removed templates' names. The caller holds the lock.

    A clone maps the memory file privately; removing the file does not disturb running clones.
    """
    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name == keep:
            continue
        if entry.name.startswith(TMP_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)
            continue
        t = load_template(entry)
        stale = t is None or any(
            _file_id(path) != t.inputs.get(name)
            for name, path in (("kernel", t.kernel), ("initrd", t.initrd), ("image", t.image)) if path)
        if stale or everything:
            log.info("factory: removing %s template %s", "stale" if stale else "old", entry.name)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def prune_templates(config: Config) -> list[str]:
    """Remove templates whose kernel/initrd/image changed on disk and unfinished ones; return the
    removed keys. Waits for a template being made right now (flock). Raises nothing for a missing
    template directory."""
    root = template_root(config)
    if not root.is_dir():
        return []
    with file_lock(root / LOCK):
        return _prune(root, keep=None)


def mark_used(template: Template) -> None:
    """Note that a VM is being started from `template` now (its directory's mtime: the files' own
    times identify the template to pool entries, pykata.shim.pooled). Never raises."""
    with contextlib.suppress(OSError):
        os.utime(template.dir)


def last_used(template: Template) -> float:
    """When a VM was last started from `template` (or it was made), seconds since the epoch."""
    try:
        return max(template.created_at, template.dir.stat().st_mtime)
    except OSError:
        return template.created_at


def templates_in_use(root: Path) -> set[str]:
    """Names of the template directories under `root` that some process uses now. How VMs reference a
    template's files: a clone's QEMU names `<dir>/memory` on its command line (mem-path=, share=off)
    and maps it privately for its whole life (guest pages it has not written are read from the file);
    while restoring, a `cat <dir>/state` child feeds migrate-incoming; a template being made writes
    `memory` through a shared mapping. So: every process's command line and memory maps (a pool's
    waiting VMs are clones too). Never raises."""
    prefixes = {f"{root}/", f"{root.resolve()}/"}
    pattern = re.compile("|".join(re.escape(p) for p in prefixes) + r"([^/\s,]+)/")
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            text += " " + (proc / "maps").read_text(errors="replace")
        except OSError:  # gone, or a kernel thread
            continue
        used.update(m.group(1) for m in pattern.finditer(text))
    return used


def prune_unused_templates(config: Config, unused_for: float = UNUSED_SECONDS,
                           keep: Collection[str] = ()) -> list[str]:
    """Remove, besides what `prune_templates` removes, every template no process uses
    (`templates_in_use`) from which no VM was started for `unused_for` seconds (`last_used`), but
    those named in `keep`; return the removed keys. Running VMs are not affected; the next VM that
    wants a removed template makes it again. Waits for a template being made (flock)."""
    root = template_root(config)
    if not root.is_dir():
        return []
    with file_lock(root / LOCK):
        removed = _prune(root, keep=None)
        in_use = templates_in_use(root)
        now = time.time()
        for t in list_templates(config):
            if t.dir.name in keep or t.dir.name in in_use or now - last_used(t) < unused_for:
                continue
            log.info("factory: removing template %s, unused for %.0f s", t.key, now - last_used(t))
            shutil.rmtree(t.dir, ignore_errors=True)
            removed.append(t.dir.name)
    return removed


async def configured_template_keys(config: Config) -> set[str]:
    """The keys of the templates VMs of `config` start from, made or not: without a NIC, with a NIC on a
    tap, with a NIC on the user-mode network (what `pykata factory init` makes).

    Raises:
        HypervisorError: the guest assets cannot be resolved.
    """
    config = templated_config(config, quiet=True)
    keys = set()
    for nics, user_net in ((0, False), (1, False), (1, True)):
        inputs, *_ = await template_inputs(config, nics, user_net=user_net)
        keys.add(key_of(inputs))
    return keys


def prune_other_templates(config: Config, keep: Collection[str], *, dry_run: bool = False) -> list[str]:
    """Remove every template under factory.template_path but those named in `keep` (the configurations'
    own: configured_template_keys) and those a process uses now (templates_in_use: a running clone, a
    pool's waiting VM), whatever their age, and what unfinished makes left; return the removed names
    (`dry_run`: what would be removed, removing nothing). Waits for a template being made (flock), so a
    template is never removed half made. Running VMs are not affected."""
    root = template_root(config)
    if not root.is_dir():
        return []
    removed = []
    with file_lock(root / LOCK):
        in_use = templates_in_use(root)
        for entry in sorted(root.iterdir()):
            if not entry.is_dir() or entry.name in keep or entry.name in in_use:
                continue
            if not dry_run:
                log.info("factory: removing template %s: no configuration given uses it", entry.name)
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def discard_template(template: Template, reason: str) -> None:
    """Remove a template that proved unusable (the next VM makes a new one). Never raises."""
    log.warning("factory: discarding template %s: %s", template.key, reason)
    shutil.rmtree(template.dir, ignore_errors=True)


async def destroy_templates(config: Config, keys: Collection[str] | None = None) -> list[str]:
    """Remove the templates named in `keys` (every one under factory.template_path, and what is left of
    unfinished ones, when None); return their keys. Nothing is removed when a key names no template.

    Raises:
        NotFound: a key names no template (`list_templates`).
        HypervisorError: another process holds the lock (making a template) for too long.
    """
    root = template_root(config)
    if not root.is_dir():
        if keys:
            raise NotFound(f"no template {sorted(keys)[0]} (pykata factory status lists them)")
        return []
    async with _locked(root, timeout=MAX_STRETCH * config.qemu.boot_timeout + 60):
        templates = {t.dir.name: t for t in list_templates(config)}
        if keys is None:
            for entry in root.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
            return [t.key for t in templates.values()]
        unknown = sorted(k for k in keys if k not in templates)
        if unknown:
            raise NotFound(f"no template {', '.join(unknown)} (pykata factory status lists them)")
        for key in keys:
            shutil.rmtree(templates[key].dir, ignore_errors=True)
        return [templates[k].key for k in keys]


async def agent_readiness(vm: Hypervisor) -> None:
    """Readiness probe: the agent answers a health check on its channel; the connection is closed
    again (the channel is free for the VM's owner)."""
    endpoint = vm.agent_endpoint
    if endpoint.socket is None:
        raise HypervisorError("template VMs need a virtio-serial agent channel")
    client = await Agent.connect(endpoint.socket, "template", timeout=3600, connection=vm.take_agent_connection())
    await client.close()


async def sync_guest_clock(agent: Agent) -> None:
    """Set a restored guest's wall clock to the host's. Raises AgentError."""
    now = time.time_ns() // 1000
    await agent.set_guest_date_time(now // 1_000_000, now % 1_000_000, timeout=5)
