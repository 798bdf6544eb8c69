"""Persisted sandbox state under <runtime_dir>/sandboxes/<id>/state.json, so another process (the CLI,
a restarted shim, `pykata cleanup`) can find a sandbox, reach it and clean it up."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pykata.fsutil import atomic_write

STATE_FILE = "state.json"
VM_DIR = "vm"  # in a sandbox's directory: the VM's sockets, logs and process records


@dataclass
class ContainerRecord:
    id: str
    image: str = ""
    command: list[str] = field(default_factory=list)
    status: str = "created"  # created | running | exited
    exit_code: int | None = None
    created_at: float = 0.0
    finished_at: float | None = None
    # who its init runs as: [uid, gid, supplementary groups...] (empty: not recorded, root); `pykata exec`
    # without -u runs as that user, as docker exec does
    user: list[int] = field(default_factory=list)


@dataclass
class SandboxRecord:
    id: str
    owner_pid: int
    created_at: float
    status: str = "creating"  # creating | running | stopped
    vmm_pid: int | None = None
    name: str = ""
    containers: dict[str, ContainerRecord] = field(default_factory=dict)

    def owner_alive(self) -> bool:
        try:
            proc = psutil.Process(self.owner_pid)
            # a zombie owner has finished: only its parent has not reaped it yet
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRecord:
        containers = {k: ContainerRecord(**v) for k, v in (data.pop("containers", None) or {}).items()}
        return cls(**data, containers=containers)


def save(directory: Path, record: SandboxRecord) -> None:
    """Write atomically: a reader never sees half a file."""
    atomic_write(directory / STATE_FILE, json.dumps(asdict(record), indent=1), mode=0o600)


def load(directory: Path) -> SandboxRecord | None:
    """The record in `directory`, or None when there is none or it is unreadable."""
    try:
        return SandboxRecord.from_json(json.loads((directory / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def list_sandboxes(sandboxes_dir: Path) -> list[tuple[Path, SandboxRecord | None]]:
    if not sandboxes_dir.is_dir():
        return []
    return [(d, load(d)) for d in sorted(sandboxes_dir.iterdir()) if d.is_dir()]
