"""Where the agent keeps things and what it may touch (set from the command line)."""

from __future__ import annotations

from pathlib import Path

from pykata.agent.stdio import DEFAULT_BUFFER_LIMIT
from pykata.agent.validation import CGROUP_NAME_RE
from pykata.record import FrozenRecord

DEFAULT_STATE_DIR = Path("/run/pykata-agent")


class AgentSettings(FrozenRecord):
    """Layout of the agent's state directory:

        <state>/crun/       crun --root
        <state>/bundles/ID  config.json, process files and pid files of container ID
        <state>/storage/    default place for storages the host asks the agent to mount
        <state>/sandbox/    files the agent writes for the sandbox (resolv.conf)
        <state>/emptydir/   the pod's emptyDir volumes made in the guest (one tmpfs each, named by
                            the volume; they live as long as the sandbox, not one container)
        <state>/sock/       console sockets for crun (short names: sun_path is 108 bytes)
        <state>/logs/       crun's one-off error logs
        <shared>            where the host's shared file system appears (default <state>/shared)

    Container roots and bind-mount sources must lie in <shared>, <state>/storage, <state>/sandbox
    or <state>/emptydir; storages may be mounted only in <shared>, <state>/storage or (the pod's
    volumes) <state>/emptydir.
    """

    __slots__ = ("buffer_limit", "cgroup_parent", "cgroup_root", "crun", "exec_spawner", "exec_start", "native_exec",
                 "shared_dir", "state_dir")
    __match_args__ = ("state_dir", "shared_dir", "cgroup_parent", "crun", "buffer_limit", "cgroup_root", "native_exec",
                      "exec_spawner", "exec_start")
    state_dir: Path
    shared_dir: Path | None
    cgroup_parent: str
    crun: str
    buffer_limit: int
    cgroup_root: Path
    native_exec: bool
    exec_spawner: bool
    exec_start: bool

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR, shared_dir: Path | None = None,
                 # Containers go to cgroup /<cgroup_parent>/<container id> (one agent serves one sandbox).
                 cgroup_parent: str = "pykata", crun: str = "crun", buffer_limit: int = DEFAULT_BUFFER_LIMIT,
                 cgroup_root: Path = Path("/sys/fs/cgroup"),
                 # Exec processes with the agent's own setns path (nsexec) where it covers the spec, else crun.
                 native_exec: bool = True,
                 # ... and fork its children from a small helper process started with the agent
                 # (agent/spawner.py), not from the agent itself. Off: measured no faster under TCG
                 # (bench/exec_bench.py's in-guest table, Nov 2026: ~200 ms until the pid either way on a
                 # host at load 24; the spawner's own fork and the extra hand-off ate what the agent's fork
                 # cost).
                 exec_spawner: bool = False,
                 # ... and start them with the image's exec starter (nsexec.EXECSTART, posix_spawn: the agent
                 # is not forked) where it has one and the plan fits; the fork otherwise.
                 exec_start: bool = True) -> None:
        if not all(CGROUP_NAME_RE.match(p) for p in cgroup_parent.split("/")):
            raise ValueError(f"cgroup parent {cgroup_parent!r}: use names separated by '/'")
        self._init("state_dir", state_dir)
        self._init("shared_dir", shared_dir)
        self._init("cgroup_parent", cgroup_parent)
        self._init("crun", crun)
        self._init("buffer_limit", buffer_limit)
        self._init("cgroup_root", cgroup_root)
        self._init("native_exec", native_exec)
        self._init("exec_spawner", exec_spawner)
        self._init("exec_start", exec_start)

    @property
    def shared(self) -> Path:
        return self.shared_dir if self.shared_dir is not None else self.state_dir / "shared"

    @property
    def crun_root(self) -> Path:
        return self.state_dir / "crun"

    @property
    def bundles(self) -> Path:
        return self.state_dir / "bundles"

    @property
    def storage_dir(self) -> Path:
        return self.state_dir / "storage"

    @property
    def sandbox_dir(self) -> Path:
        return self.state_dir / "sandbox"

    @property
    def pod_volume_dir(self) -> Path:
        return self.state_dir / "emptydir"

    @property
    def socket_dir(self) -> Path:
        return self.state_dir / "sock"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def source_roots(self) -> list[Path]:
        return [self.shared, self.storage_dir, self.sandbox_dir, self.pod_volume_dir]

    @property
    def mount_roots(self) -> list[Path]:
        return [self.shared, self.storage_dir, self.pod_volume_dir]

    def cgroups_path(self, container_id: str) -> str:
        return f"/{self.cgroup_parent}/{container_id}"

    def make_dirs(self) -> None:
        for d in (self.state_dir, self.crun_root, self.bundles, self.storage_dir, self.sandbox_dir,
                  self.pod_volume_dir, self.socket_dir, self.log_dir, self.shared):
            d.mkdir(parents=True, exist_ok=True, mode=0o700 if d != self.shared else 0o755)
