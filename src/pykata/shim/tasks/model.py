"""What the shim knows about each task: containers, their processes, states and exit statuses.

A process is `created` -> `running` -> `stopped`, once (`set_exited` decides the exit status exactly
once, whoever sees the end first: the process's own wait, the VM's death, a Delete). A container's
init process is the task containerd names by the container id; execs are named by exec id.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp

from pykata.errors import InvalidArgument, NotFound
from pykata.ids import check_process_user
from pykata.protocols import mount_pb2, task_types_pb2
from pykata.protocols.agent import agent_pb2
from pykata.resources.mounts import RootfsMount
from pykata.sandbox import Container, Process
from pykata.sandbox.ocispec import check_security_labels
from pykata.shim.stdio import ProcessIO, Stdio

MAX_SPEC_BYTES = 16 << 20
# exit status when the VM (and with it every process) was killed or vanished
VM_GONE_STATUS = 128 + 9

State = Literal["created", "running", "stopped"]


def timestamp(ts: Timestamp | None) -> Timestamp:
    """`ts`, or the zero Timestamp for a process that has not exited."""
    return ts if ts is not None else Timestamp()


def now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


class ShimProcess:
    """A container's init (exec_id "") or one of its execs."""

    def __init__(self, container_id: str, exec_id: str, stdio: Stdio, spec: dict[str, Any] | None = None) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.spec = spec  # an exec's OCI process
        # What containerd sees as the process's pid: the VMM's (as Kata reports), never a pid the
        # guest chose (a monitoring agent that kills or nsenters it would act on a host process).
        self.pid = 0
        # The pid in the guest, as the agent says: for logs only.
        self.guest_pid = 0
        self.state: State = "created"
        self.exit_status = 0
        self.exited_at: Timestamp | None = None
        self.proc: Process | None = None
        self.io: ProcessIO | None = None
        self.exited = asyncio.Event()
        # held while starting (until the start event is queued) and while recording the exit, so
        # that containerd never sees a TaskExit before the TaskStart of the same process
        self.lock = asyncio.Lock()
        self.waiter: asyncio.Task[None] | None = None
        self.console_size: tuple[int, int] | None = None  # (rows, columns) asked for before start
        self.deleted = False

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    @property
    def stopped(self) -> bool:
        """Read anew after every await (an exit may have come meanwhile)."""
        return self.state == "stopped"

    def set_exited(self, status: int) -> bool:
        """Record the exit; True only for the call that made the process stopped."""
        if self.state == "stopped":
            return False
        self.state = "stopped"
        self.exit_status = status
        self.exited_at = now_timestamp()
        self.exited.set()
        return True


class ShimContainer:
    """One task containerd created in this shim's sandbox."""

    def __init__(self, container_id: str, bundle: Path, spec: dict[str, Any], stdio: Stdio,
                 rootfs: list[mount_pb2.Mount]) -> None:
        self.id = container_id
        self.bundle = bundle
        self.spec = spec
        self.rootfs = rootfs
        self.init = ShimProcess(container_id, "", stdio)
        self.execs: dict[str, ShimProcess] = {}
        self.sandbox_container: Container | None = None
        self.paused = False
        self.deleted = False
        self.deleting: asyncio.Task[Any] | None = None  # the one deletion; repeated Deletes wait for it
        self.lock = asyncio.Lock()
        # A pod's sandbox container answered for by the shim, with no process in the guest until one
        # is needed (pykata.shim.tasks.pause); guest_lock orders its making and a Kill.
        self.guestless = False
        self.guest_lock = asyncio.Lock()

    def process(self, exec_id: str) -> ShimProcess:
        """The init ("") or the named exec. Raises NotFound."""
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise NotFound(f"process {exec_id} does not exist in container {self.id}")
        return p

    def processes(self) -> list[ShimProcess]:
        return [self.init, *self.execs.values()]

    def status(self, p: ShimProcess) -> task_types_pb2.Status:
        """containerd's Status of `p` (a running process of a paused container is PAUSED)."""
        if p.state == "created":
            return task_types_pb2.CREATED
        if p.state == "stopped":
            return task_types_pb2.STOPPED
        return task_types_pb2.PAUSED if self.paused else task_types_pb2.RUNNING


def rootfs_mounts(bundle: Path, spec: dict[str, Any], mounts: list[mount_pb2.Mount]) -> list[RootfsMount]:
    """The mounts that make a container's root: containerd's, or else the bundle's root directory."""
    rootfs = [RootfsMount(m.type, m.source, tuple(m.options)) for m in mounts]
    if not rootfs:
        root = (spec.get("root") or {}).get("path") or "rootfs"
        rootfs = [RootfsMount("bind", str(bundle / root), ("rbind", "rw"))]
    return rootfs


def load_spec(bundle: Path) -> dict[str, Any]:
    """The bundle's config.json. Raises InvalidArgument naming config.json."""
    path = bundle / "config.json"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise InvalidArgument("config.json", f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise InvalidArgument("config.json", f"{path} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        spec = json.loads(data)
    except ValueError as e:
        raise InvalidArgument("config.json", f"{path}: invalid JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
        raise InvalidArgument("config.json", f"{path} has no process object")
    return spec


def exec_process(spec: Any, *, terminal: bool, console_size: tuple[int, int] | None) -> agent_pb2.Process:
    """The agent's Process for an exec's OCI process (as containerd sends it in ExecProcessRequest.spec).

    Raises InvalidArgument naming the spec field that is wrong.
    """
    if not isinstance(spec, dict):
        raise InvalidArgument("spec", "not an OCI process object")
    args = spec.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("spec.args", "must be a non-empty list of strings")
    env = spec.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise InvalidArgument("spec.env", "must be a list of strings")
    user = spec.get("user") or {}
    check_process_user(user, "spec.user")  # an object of ids in runc's range (never (uid_t)-1)
    check_security_labels(spec, field="spec")
    try:
        proc = agent_pb2.Process(
            args=args, env=env, cwd=str(spec.get("cwd") or "/"), terminal=terminal,
            user=agent_pb2.User(uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
                                additional_gids=[int(g) for g in user.get("additionalGids") or []],
                                username=str(user.get("username") or "")),
            no_new_privileges=bool(spec.get("noNewPrivileges", False)),
            apparmor_profile=str(spec.get("apparmorProfile") or ""),
            selinux_label=str(spec.get("selinuxLabel") or ""),
        )
        if user.get("umask") is not None:
            proc.user.umask = int(user["umask"])
        if spec.get("oomScoreAdj") is not None:
            proc.oom_score_adj = int(spec["oomScoreAdj"])
        caps = spec.get("capabilities") or {}
        for kind in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            getattr(proc.capabilities, kind).extend(str(c) for c in caps.get(kind) or [])
        for r in spec.get("rlimits") or []:
            proc.rlimits.add(type=str(r["type"]), hard=int(r["hard"]), soft=int(r["soft"]))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise InvalidArgument("spec", f"invalid OCI process: {e}") from None
    size = spec.get("consoleSize")
    if console_size is not None:
        proc.console_height, proc.console_width = console_size
    elif isinstance(size, dict):
        proc.console_height, proc.console_width = int(size.get("height", 0)), int(size.get("width", 0))
    return proc
