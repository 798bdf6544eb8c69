"""Saving and loading a VM's state over QMP (QEMU migration to and from a file).

Templates: their RAM already lives in a shared memory file, so the stream is written with the
`x-ignore-shared` capability and carries device state only (tens of milliseconds). A clone loads it
into a QEMU started with `-incoming defer` whose RAM maps the same file privately.

Snapshots (`save_snapshot`): the stream carries guest RAM too (zero pages as a flag each), written at
full speed (QEMU throttles migrations to 128 MiB/s unless told otherwise).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pykata.errors import HypervisorError
from pykata.hypervisor.errors import QmpError
from pykata.hypervisor.qemu.qmp import QmpChannel, QmpListener, qemu_text
from pykata.hypervisor.readiness import log_tail

# Moving only device state (RAM stays in the template's file) takes milliseconds.
MIGRATE_TIMEOUT = 30.0
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
_WITH_RAM = {"capabilities": [{"capability": "x-ignore-shared", "state": False}]}
# bytes/s: no throttle (QEMU's bound is INT64_MAX / 1000)
_UNTHROTTLED = {"max-bandwidth": 1 << 50, "downtime-limit": 2000}


async def save_state(qmp: QmpChannel, path: Path, *, label: str, qemu_log: Path) -> None:
    """Pause the guest and write its device state (not its shared RAM) to `path`; the VM stays paused.

    Raises:
        HypervisorError: QEMU refused, the migration failed or took longer than MIGRATE_TIMEOUT.
    """
    await qmp.execute("stop")
    # RAM is already in the shared file: leave it out of the stream.
    await qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
    # The state file is opened here and passed in: a jailed QEMU can neither open host paths nor
    # spawn `cat` (seccomp spawn=deny).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        await qmp.execute("getfd", {"fdname": "migrate-save"}, fd=fd)
    finally:
        os.close(fd)
    await qmp.execute("migrate", {"uri": "fd:migrate-save"})
    await wait_completed(qmp, "save", label=label, qemu_log=qemu_log)


async def save_snapshot(qmp: QmpChannel, fd: int, *, label: str, qemu_log: Path) -> None:
    """Pause the guest and write its whole state, RAM included, to the open file `fd` (passed to
    QEMU, which a jail keeps from opening host paths); the VM stays paused (`cont` runs it again).

    Raises:
        HypervisorError: QEMU refused (e.g. a mounted 9p share blocks migration), the migration failed
            or took longer than MIGRATE_TIMEOUT.
    """
    await qmp.execute("stop")
    await qmp.execute("migrate-set-capabilities", _WITH_RAM)
    await qmp.execute("migrate-set-parameters", _UNTHROTTLED)
    await qmp.execute("getfd", {"fdname": "migrate-snapshot"}, fd=fd)
    await qmp.execute("migrate", {"uri": "fd:migrate-snapshot"})
    await wait_completed(qmp, "snapshot", label=label, qemu_log=qemu_log)


async def prepare_load(qmp: QmpChannel, path: Path, *, ignore_shared: bool, label: str) -> None:
    """Before a load into a QEMU waiting for an incoming migration: the capabilities set and the state
    file written by save_state() handed to QEMU (a pre-started QEMU does it while it waits, off a
    clone's clock); run_load() then loads it. `ignore_shared` must match how the stream was written
    (x-ignore-shared changes its layout).

    Raises:
        HypervisorError: the file cannot be opened, or QEMU refused.
    """
    # QEMU announces the end of the load (the MIGRATION event): no polling, no round trip after it.
    capabilities = [{"capability": "events", "state": True}]
    if ignore_shared:
        capabilities.append({"capability": "x-ignore-shared", "state": True})
    await qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"{label}: cannot open the saved state {path}: {exc.strerror}") from None
    try:
        await qmp.execute("getfd", {"fdname": "migrate-restore"}, fd=fd)
    finally:
        os.close(fd)


async def run_load(qmp: QmpChannel, *, label: str, qemu_log: Path) -> None:
    """Load the state prepare_load() handed to QEMU (not resumed). Raises HypervisorError."""
    with qmp.listener("MIGRATION", where=lambda e: e.data.get("status") in _ENDED) as ended:
        await qmp.execute("migrate-incoming", {"uri": "fd:migrate-restore"})
        await _wait_ended(qmp, ended, "restore", label=label, qemu_log=qemu_log)


_ENDED = ("completed", "failed", "cancelled")
# A MIGRATION event missed (it should never be) costs at most this before query-migrate is asked.
_EVENT_RECHECK = 0.5


async def _wait_ended(qmp: QmpChannel, ended: QmpListener, what: str, *, label: str, qemu_log: Path) -> None:
    """Wait for the MIGRATION event that ends a migration; raise HypervisorError unless it completed
    (or after MIGRATE_TIMEOUT). query-migrate is asked only when no event came for a while."""
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    while True:
        try:
            status = (await ended.get(min(_EVENT_RECHECK, max(0.0, deadline - time.monotonic())))).data.get("status")
        except QmpError:
            if qmp.closed:
                raise
            status = None
        if status is None:
            info = await qmp.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            info = await qmp.execute("query-migrate")
            desc = qemu_text(info.get("error-desc", "no reason given")) if isinstance(info, dict) else "no reason given"
            raise HypervisorError(f"{label}: {what} failed: {desc}; qemu: {log_tail(qemu_log, 800)}")
        if time.monotonic() > deadline:
            raise HypervisorError(f"{label}: {what} not done after {MIGRATE_TIMEOUT:.0f}s (status {qemu_text(status)})")


async def wait_completed(qmp: QmpChannel, what: str, *, label: str, qemu_log: Path) -> None:
    """Poll query-migrate until the migration completed.

    Raises:
        HypervisorError: it failed, was cancelled, or is not done after MIGRATE_TIMEOUT.
    """
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    delay = 0.001
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            desc = qemu_text(info.get("error-desc", "no reason given"))
            raise HypervisorError(f"{label}: {what} failed: {desc}; qemu: {log_tail(qemu_log, 800)}")
        if time.monotonic() > deadline:
            raise HypervisorError(f"{label}: {what} not done after {MIGRATE_TIMEOUT:.0f}s (status {qemu_text(status)})")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
