"""Sandbox-wide state in the guest: host name, DNS, shared storages, the shared pid namespace."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from pykata.agent import command, sysmount
from pykata.agent.reaper import Reaper
from pykata.agent.settings import AgentSettings
from pykata.agent.storage import Mounted, Storages
from pykata.agent.validation import (
    check_count,
    check_id,
    check_string,
)
from pykata.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from pykata.ids import HOSTNAME_RE
from pykata.protocols.agent import agent_pb2

log = logging.getLogger("pykata.agent.sandbox")

DNS_RE = re.compile(r"^(nameserver|search|domain|options|sortlist)[ \t][\x20-\x7e]{1,250}$")
MODULE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MODULE_PARAM_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}=[\x21-\x7e]{0,256}$")
MODPROBE = ("/sbin/modprobe", "/usr/sbin/modprobe")

# Run by a child Python: unshare the pid namespace, fork its init (which only waits), print the
# init's pid. The init lives until the agent kills it in DestroySandbox.
_PIDNS_HOLDER = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x20000000) != 0:
    sys.stderr.write("unshare(CLONE_NEWPID): " + os.strerror(ctypes.get_errno()) + "\\n")
    sys.exit(1)
pid = os.fork()
if pid == 0:
    os.setsid()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    while True:
        signal.pause()
print(pid, flush=True)
"""


def set_hostname(name: str) -> None:
    libc = sysmount.libc()  # loaded at the agent's start (sysmount.resolve), not in each clone
    raw = name.encode()
    if libc.sethostname(raw, len(raw)) != 0:
        err = ctypes.get_errno()
        raise Internal(f"sethostname: {os.strerror(err)}")


class Sandbox:
    """What CreateSandbox set up, so DestroySandbox can undo it."""

    def __init__(self, settings: AgentSettings, reaper: Reaper, storages: Storages) -> None:
        self.settings = settings
        self.reaper = reaper
        self.storages = storages
        self.id = ""
        self.mounts: list[Mounted] = []
        self.pidns_holder = 0
        self.resolv_conf: Path | None = None

    @property
    def created(self) -> bool:
        return bool(self.id)

    def pid_ns_path(self) -> str | None:
        return f"/proc/{self.pidns_holder}/ns/pid" if self.pidns_holder else None

    def extra_mounts(self) -> list[dict[str, Any]]:
        """Mounts every container gets unless its spec has its own (the sandbox's resolv.conf)."""
        if self.resolv_conf is None:
            return []
        return [{"destination": "/etc/resolv.conf", "type": "bind", "source": str(self.resolv_conf),
                 "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}]

    async def create(self, req: agent_pb2.CreateSandboxRequest) -> None:
        """Raises AlreadyExists, InvalidArgument naming the field, Internal."""
        if self.created:
            raise AlreadyExists(f"sandbox {self.id} already exists")
        sid = check_id("sandbox_id", req.sandbox_id)
        if req.hostname and not HOSTNAME_RE.match(req.hostname):
            raise InvalidArgument("hostname", f"{req.hostname!r} is not a host name")
        check_count("dns", req.dns, 32)
        for i, line in enumerate(req.dns):
            check_dns_line(f"dns[{i}]", line)
        check_count("storages", req.storages)
        check_count("kernel_modules", req.kernel_modules, 64)
        for i, mod in enumerate(req.kernel_modules):
            if not MODULE_RE.match(mod.name):
                raise InvalidArgument(f"kernel_modules[{i}].name", f"{mod.name!r} is not a module name")
            check_count(f"kernel_modules[{i}].parameters", mod.parameters, 64)
            for j, p in enumerate(mod.parameters):
                if not MODULE_PARAM_RE.match(p):
                    raise InvalidArgument(f"kernel_modules[{i}].parameters[{j}]", f"{p[:80]!r} is not key=value")
        async with contextlib.AsyncExitStack() as undo:
            for mod in req.kernel_modules:
                await self._modprobe(mod)
            mounts: list[Mounted] = []
            undo.callback(self.storages.unmount, mounts)
            for i, storage in enumerate(req.storages):
                mounts.append(await asyncio.to_thread(self.storages.mount, storage, f"storages[{i}]"))
            if req.hostname:
                set_hostname(req.hostname)
            if req.dns:
                path = self.settings.sandbox_dir / "resolv.conf"
                path.write_text("".join(f"{line}\n" for line in req.dns))
                path.chmod(0o644)
                self.resolv_conf = path
                if os.getpid() == 1:  # the guest's /etc/resolv.conf points at /run/resolv.conf
                    with contextlib.suppress(OSError):
                        Path("/run/resolv.conf").write_text(path.read_text())
            if req.sandbox_pidns:
                self.pidns_holder = await self._start_pidns_holder()
            undo.pop_all()
        self.mounts = mounts
        self.id = sid
        log.info("sandbox %s created", sid)

    async def _modprobe(self, mod: agent_pb2.KernelModule) -> None:
        binary = next((m for m in MODPROBE if os.access(m, os.X_OK)), None)
        if binary is None:
            raise FailedPrecondition("kernel_modules: the guest has no modprobe")
        result = await command.run(self.reaper, [binary, mod.name, *mod.parameters], timeout=30)
        if not result.ok:
            msg = result.stderr.decode(errors="replace").strip()[:500]
            raise Internal(f"modprobe {mod.name}: {msg or result.status.code}")

    async def _start_pidns_holder(self) -> int:
        result = await command.run(self.reaper, [sys.executable, "-S", "-c", _PIDNS_HOLDER], timeout=60,
                                   env={**command.DEFAULT_ENV, "PYTHONDONTWRITEBYTECODE": "1"})
        out = result.stdout.decode(errors="replace").strip()
        if not result.ok or not out.isdigit():
            raise Internal("cannot create the sandbox pid namespace: "
                                          f"{result.stderr.decode(errors='replace').strip()[:500]}")
        return int(out)

    async def destroy(self) -> list[str]:
        """Undo create (containers are removed by the caller first). Returns error messages."""
        errors: list[str] = []
        if self.pidns_holder:
            fut = self.reaper.watch(self.pidns_holder)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pidns_holder, signal.SIGKILL)
            try:
                async with asyncio.timeout(10):
                    await fut
            except TimeoutError:
                errors.append(f"pid namespace holder {self.pidns_holder} did not die")
            self.pidns_holder = 0
        errors.extend(self.storages.unmount(self.mounts))
        self.mounts = []
        # the pod's emptyDir volumes: they outlive containers, not the sandbox
        errors.extend(self.storages.unmount_pod_volumes())
        if self.resolv_conf is not None:
            with contextlib.suppress(OSError):
                self.resolv_conf.unlink()
            self.resolv_conf = None
        self.id = ""
        return errors


def check_dns_line(field: str, line: str) -> str:
    check_string(field, line, max_len=256)
    if not DNS_RE.match(line):
        raise InvalidArgument(field, f"{line[:80]!r} is not a resolv.conf line")
    return line
