"""Choosing the accelerator: KVM only where KVM can really boot the guest, else TCG.

`/dev/kvm` existing is not enough: on nested paravirtual hosts (PVM) it opens fine and stock guest
kernels then hang. So "auto" boots the guest kernel once under `-accel kvm` with a busybox initrd and
a deadline; the verdict is cached per kernel, QEMU binary and host kernel, so the trial runs once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pykata.config.schema import QemuConfig
from pykata.errors import HypervisorError
from pykata.fsutil import atomic_write
from pykata.hypervisor.busybox_initrd import find_busybox, write_busybox_initrd
from pykata.hypervisor.process import ChildProcess
from pykata.hypervisor.qemu.launch import LaunchSpec, VmPaths, build_command_line
from pykata.hypervisor.readiness import log_tail, wait_for_console_line

log = logging.getLogger("pykata.hypervisor")

KVM_DEVICE = Path("/dev/kvm")
PROBE_MARKER = b"PYKATA_KVM_PROBE_OK"
PROBE_INIT = "#!/bin/sh\necho PYKATA_KVM_PROBE_OK\npoweroff -f\n"
VERDICT_VERSION = 1
_memo: dict[str, AccelVerdict] = {}
_logged: set[str] = set()
_inflight: dict[tuple[int, str], asyncio.Future[AccelVerdict]] = {}


@dataclass(frozen=True)
class AccelVerdict:
    accel: Literal["kvm", "tcg"]
    reason: str
    # Seconds the KVM trial boot took (None: no trial ran for this verdict).
    probe_seconds: float | None = None
    cached: bool = False


def kvm_device_usable(device: Path | None = None) -> str | None:
    """None if `device` (default /dev/kvm) can be opened read-write, else why not."""
    device = device or KVM_DEVICE
    if not device.exists():
        return f"{device} does not exist (no hardware virtualization, or the kvm module is not loaded)"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {device}: {exc.strerror}"
    os.close(fd)
    return None


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def verdict_key(qemu: Path, kernel: Path) -> str:
    """What the verdict depends on: the guest kernel, the QEMU binary and the host kernel.

    Raises:
        OSError: one of the files is missing.
    """
    parts = [str(VERDICT_VERSION), _file_id(kernel), _file_id(qemu), platform.release()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _verdict_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "accel" / f"{key}.json"


def _load_verdict(cache_dir: Path, key: str) -> AccelVerdict | None:
    try:
        data = json.loads(_verdict_path(cache_dir, key).read_text())
        if data.get("accel") not in ("kvm", "tcg") or not isinstance(data.get("reason"), str):
            return None
        seconds = data.get("probe_seconds")
        return AccelVerdict(data["accel"], data["reason"],
                            float(seconds) if isinstance(seconds, int | float) else None, cached=True)
    except (OSError, ValueError, AttributeError):
        return None


def _store_verdict(cache_dir: Path, key: str, verdict: AccelVerdict) -> None:
    path = _verdict_path(cache_dir, key)
    try:
        atomic_write(path, json.dumps(dataclasses.asdict(verdict)))
    except OSError as exc:
        log.debug("cannot cache the accelerator verdict in %s: %s", path, exc)


async def resolve_accelerator(config: QemuConfig, kernel: Path, cache_dir: Path, *,
                              use_cache: bool = True) -> AccelVerdict:
    """Turn `config.accelerator` into "kvm" or "tcg".

    "auto" gives KVM only if a trial boot under KVM reaches the guest init within
    `config.kvm_probe_timeout`; the verdict is cached under `cache_dir/accel/`. A fall back to TCG is
    logged once per process with the reason.

    Raises:
        HypervisorError: "kvm" was forced but /dev/kvm is unusable.
    """
    if config.accelerator == "tcg":
        return AccelVerdict("tcg", "hypervisor.qemu.accelerator = \"tcg\"")
    unusable = kvm_device_usable()
    if config.accelerator == "kvm":
        if unusable:
            raise HypervisorError(f"hypervisor.qemu.accelerator is \"kvm\" but {unusable}")
        return AccelVerdict("kvm", "hypervisor.qemu.accelerator = \"kvm\"")
    if unusable:
        verdict = AccelVerdict("tcg", unusable)
    else:
        verdict = await _probe_cached(config, kernel, cache_dir, use_cache)
    if verdict.accel == "tcg" and verdict.reason not in _logged:
        _logged.add(verdict.reason)
        # said loudly once, when the trial boot decided it; later runs reuse the verdict quietly
        log.log(logging.INFO if verdict.cached else logging.WARNING,
                "KVM is not usable, running VMs with TCG emulation (slower): %s", verdict.reason)
    return verdict


async def _probe_cached(config: QemuConfig, kernel: Path, cache_dir: Path, use_cache: bool) -> AccelVerdict:
    try:
        key = verdict_key(Path(config.path), kernel)
    except OSError as exc:  # the binary named by the configuration (the kernel was checked before)
        field = "hypervisor.qemu.kernel" if exc.filename == str(kernel) else "hypervisor.qemu.path"
        raise HypervisorError(f"{field}: cannot read {exc.filename}: {exc.strerror}") from None
    if use_cache:
        if key in _memo:
            return _memo[key]
        stored = _load_verdict(cache_dir, key)
        if stored is not None:
            _memo[key] = stored
            return stored
    # Concurrent VMs starting in one process share one trial boot.
    slot = (id(asyncio.get_running_loop()), key)
    task = _inflight.get(slot)
    if task is None:
        task = asyncio.ensure_future(probe_kvm(config, kernel))
        _inflight[slot] = task
        try:
            verdict = await asyncio.shield(task)
        finally:
            _inflight.pop(slot, None)
        _memo[key] = dataclasses.replace(verdict, cached=True)
        _store_verdict(cache_dir, key, verdict)
        return verdict
    return await asyncio.shield(task)


async def probe_kvm(config: QemuConfig, kernel: Path) -> AccelVerdict:
    """Boot `kernel` with a busybox initrd under `-accel kvm`; KVM if its init runs within the deadline.

    Never raises for a failed trial: a failure is a "tcg" verdict with the reason.
    """
    busybox = find_busybox()
    if busybox is None:
        return AccelVerdict("tcg", "cannot run the KVM trial boot: busybox not found (install busybox-static)")
    workdir = Path(tempfile.mkdtemp(prefix="pykata-kvm-probe-"))
    child: ChildProcess | None = None
    started = time.monotonic()
    try:
        initrd = write_busybox_initrd(workdir / "probe.cpio", PROBE_INIT, busybox)
        probe_cfg = dataclasses.replace(config, machine_type="microvm", default_vcpus=1, default_maxvcpus=1,
                                        default_memory=128, default_maxmemory=0, memory_balloon=False,
                                        kernel_params="", enable_debug=False)
        paths = VmPaths(workdir)
        spec = LaunchSpec(vm_id="kvm-probe", config=probe_cfg, accel="kvm", kernel=kernel, initrd=initrd,
                          paths=paths)
        argv = build_command_line(spec).argv()
        try:
            child = await ChildProcess.spawn(argv, name="qemu (KVM probe)", log_path=paths.qemu_log)
        except OSError as exc:
            return AccelVerdict("tcg", f"cannot run {config.path}: {exc.strerror}")
        started = time.monotonic()
        marker = asyncio.ensure_future(wait_for_console_line(paths.console_log, PROBE_MARKER))
        exited = asyncio.ensure_future(child.wait())
        done, _ = await asyncio.wait({marker, exited}, timeout=config.kvm_probe_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        elapsed = time.monotonic() - started
        marker.cancel()
        exited.cancel()
        if marker in done:
            return AccelVerdict("kvm", f"a trial boot under KVM reached init in {elapsed:.2f}s", elapsed)
        if exited in done:
            tail = log_tail(paths.qemu_log, 400).replace("\n", " | ")
            return AccelVerdict("tcg", f"QEMU with -accel kvm failed ({child.returncode}): {tail}", elapsed)
        return AccelVerdict(
            "tcg",
            f"a trial boot of {kernel.name} under KVM did not reach init within {config.kvm_probe_timeout:.1f}s "
            "(nested or paravirtual KVM, e.g. PVM, that cannot run this guest kernel)",
            elapsed,
        )
    finally:
        if child is not None:
            await child.kill()
        shutil.rmtree(workdir, ignore_errors=True)
