"""Find sandboxes by id, id prefix or name; clean up the ones whose owner died."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pykata.config import Config
from pykata.errors import NotFound
from pykata.network import egress
from pykata.sandbox import reaper, state
from pykata.sandbox.sandbox import AGENT_PROXY_SOCKET, sandboxes_dir


class NotFoundError(NotFound):
    """No sandbox or container matches; `ref` names what was asked for."""

    def __init__(self, ref: str, message: str = "no such container") -> None:
        super().__init__(f"{message}: {ref}")
        self.ref = ref


@dataclass
class Found:
    dir: Path
    record: state.SandboxRecord

    @property
    def running(self) -> bool:
        return self.record.status in ("running", "creating") and self.record.owner_alive()

    @property
    def proxy_socket(self) -> Path:
        return self.dir / AGENT_PROXY_SOCKET


def find(config: Config, ref: str, what: str = "container") -> Found:
    """The sandbox whose id, id prefix or name is `ref`. Raises NotFoundError (also when ambiguous), saying
    "no such `what`" (a `pykata run` container is its sandbox: the commands name what they take)."""
    if not ref:
        raise NotFoundError(ref, f"no such {what}")
    matches = []
    for d, rec in state.list_sandboxes(sandboxes_dir(config)):
        if rec is None:
            continue
        if rec.id == ref or rec.name == ref:
            return Found(d, rec)
        if rec.id.startswith(ref):
            matches.append(Found(d, rec))
    if len(matches) == 1:
        return matches[0]
    raise NotFoundError(ref, "ambiguous id" if matches else f"no such {what}")


def remove_sandbox_dir(directory: Path, record: state.SandboxRecord | None) -> None:
    """Kill what the sandbox left running, undo its mounts and delete its directory (a sandbox taken
    from the warm pool: the link and the pool directory it names). Raises MountError (pykata.sandbox.reaper,
    which does the same when the owner dies)."""
    reaper.remove_sandbox_dir(directory, record)


def cleanup_orphans(config: Config) -> list[str]:
    """Remove sandboxes whose owner process is gone while they were not stopped (a crashed `pykata
    run`, a killed shim). Returns the ids removed. Exited containers kept for `ps -a` stay."""
    removed = []
    for d, rec in state.list_sandboxes(sandboxes_dir(config)):
        if rec is not None and (rec.status == "stopped" or rec.owner_alive()):
            continue
        if rec is None and time.time() - d.stat().st_mtime < 10:  # being created right now
            continue
        remove_sandbox_dir(d, rec)
        removed.append(rec.id if rec else d.name)
    return removed


async def sweep_filter_rules() -> list[str]:
    """Remove the egress filter rules of sandboxes whose owner was killed before it could
    (pykata.network.egress.sweep). Returns their sandbox ids. Raises EgressError."""
    return await egress.sweep()
