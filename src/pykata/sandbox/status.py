"""What an operator sees of the running sandboxes (`pykata sandbox ls/inspect`, `pykata monitor`).

Every sandbox, whoever owns it (a containerd shim, `pykata run`, the SDK), records itself in
`<runtime_dir>/sandboxes/<id>/state.json` (pykata.sandbox.state) and serves its agent on
`<id>/agent.sock` (pykata.sandbox.proxy). This module reads those records and the host's /proc
(psutil) only: nothing here trusts the guest.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pykata.config import Config
from pykata.ids import names_vm
from pykata.sandbox import state
from pykata.sandbox.sandbox import AGENT_PROXY_SOCKET, sandboxes_dir


@dataclass
class ProcessInfo:
    """One host process of a sandbox (its owner or its VMM), read from /proc."""

    pid: int
    name: str
    cpu_seconds: float
    rss_bytes: int
    threads: int
    fds: int
    pss_bytes: int | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None


@dataclass
class SandboxInfo:
    id: str
    name: str
    status: str
    owner_pid: int
    owner: str              # "shim" (containerd), "pykata" (the CLI), "sdk" or the owner's process name
    created_at: float
    uptime_seconds: float
    runtime_dir: str
    agent_socket: str
    vmm_pid: int | None
    vcpus: int | None
    memory_mib: int | None
    boot: str               # "template" (a clone of a VM template) or "cold"
    pss_bytes: int | None   # the VMM's proportional set size: what this VM really costs in RAM
    containers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def process_info(pid: int, *, pss: bool = False, io: bool = False) -> ProcessInfo:
    """psutil's view of `pid`. Raises psutil.Error when it is gone or unreadable."""
    proc = psutil.Process(pid)
    with proc.oneshot():
        cpu = proc.cpu_times()
        info = ProcessInfo(pid=pid, name=proc.name(), cpu_seconds=cpu.user + cpu.system,
                           rss_bytes=proc.memory_info().rss, threads=proc.num_threads(), fds=proc.num_fds())
        if pss:
            info.pss_bytes = proc.memory_full_info().pss
        if io:
            with contextlib.suppress(psutil.Error, AttributeError):
                counters = proc.io_counters()
                info.read_bytes, info.write_bytes = counters.read_chars, counters.write_chars
    return info


def _option(argv: list[str], flag: str) -> str | None:
    """The value of the first `flag VALUE` in a QEMU command line."""
    with contextlib.suppress(ValueError, IndexError):
        return argv[argv.index(flag) + 1]
    return None


def vm_max_vcpus(argv: list[str]) -> int | None:
    """The vCPUs QEMU has (`-smp N[,maxcpus=M]`: M, else N): what the guest can ever bring online."""
    smp = _option(argv, "-smp")
    if not smp:
        return None
    with contextlib.suppress(ValueError):
        parts = smp.split(",")
        most = [int(p.removeprefix("maxcpus=")) for p in parts if p.startswith("maxcpus=")]
        return most[0] if most else int(parts[0].removeprefix("cpus="))
    return None


def vm_shape(argv: list[str]) -> tuple[int | None, int | None, str]:
    """vCPUs, memory (MiB) and boot kind read from a QEMU command line (pykata renders `-smp N[,...]`,
    `-m NM[,...]` and, for a template clone, `-incoming defer`). A microvm has all its vCPUs from boot
    and its guest brings up `maxcpus=` of them (pykata.hypervisor.qemu.launch): that is its size at boot.
    The memory is the boot memory (a balloon's ceiling)."""
    vcpus = memory = None
    smp = _option(argv, "-smp")
    if smp:
        with contextlib.suppress(ValueError):
            vcpus = int(smp.split(",")[0].removeprefix("cpus="))
    append = _option(argv, "-append") or ""
    for param in append.split():
        if param.startswith("maxcpus="):
            with contextlib.suppress(ValueError):
                vcpus = int(param.removeprefix("maxcpus="))
    mem = _option(argv, "-m")
    if mem:
        with contextlib.suppress(ValueError):
            memory = int(mem.split(",")[0].removeprefix("size=").removesuffix("M"))
    return vcpus, memory, "template" if "-incoming" in argv else "cold"


def _vmm_argv(record: state.SandboxRecord) -> list[str] | None:
    """The VMM's command line, when the recorded pid is still this sandbox's QEMU (pids get reused)."""
    if not record.vmm_pid:
        return None
    with contextlib.suppress(psutil.Error):
        argv = psutil.Process(record.vmm_pid).cmdline()
        if names_vm(argv, record.id):
            return argv
    return None


SDK_MARK = "sdk.json"  # the SDK leaves this next to state.json (pykata.sdk.core.SDK_STATE)


def _owner_kind(pid: int, directory: Path) -> str:
    if (directory / SDK_MARK).exists():
        return "sdk"
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return "?"
    text = " ".join(argv[:3])
    if "containerd-shim-pykata-v2" in text or "pykata.shim" in text:
        return "shim"
    if "pykata" in text:
        return "pykata"
    return psutil.Process(pid).name()


def describe(directory: Path, record: state.SandboxRecord, *, pss: bool = True) -> SandboxInfo:
    """One sandbox's information; fields that cannot be read (a process just gone) are None."""
    argv = _vmm_argv(record)
    vcpus, memory, boot = vm_shape(argv) if argv else (None, None, "cold")
    pss_bytes = None
    if argv and pss and record.vmm_pid:
        with contextlib.suppress(psutil.Error):
            pss_bytes = psutil.Process(record.vmm_pid).memory_full_info().pss
    containers = [{"id": c.id, "image": c.image, "command": c.command, "status": c.status,
                   "exit_code": c.exit_code, "created_at": c.created_at} for c in record.containers.values()]
    return SandboxInfo(
        id=record.id, name=record.name, status=record.status, owner_pid=record.owner_pid,
        owner=_owner_kind(record.owner_pid, directory), created_at=record.created_at,
        uptime_seconds=max(0.0, time.time() - record.created_at), runtime_dir=str(directory),
        agent_socket=str(directory / AGENT_PROXY_SOCKET), vmm_pid=record.vmm_pid if argv else None,
        vcpus=vcpus, memory_mib=memory, boot=boot, pss_bytes=pss_bytes, containers=containers)


def running(config: Config) -> list[tuple[Path, state.SandboxRecord]]:
    """The sandboxes whose owner lives and that are not stopped, by id."""
    return [(d, rec) for d, rec in state.list_sandboxes(sandboxes_dir(config))
            if rec is not None and rec.status in ("creating", "running") and rec.owner_alive()]


def list_running(config: Config, *, pss: bool = True) -> list[SandboxInfo]:
    return [describe(d, rec, pss=pss) for d, rec in running(config)]
