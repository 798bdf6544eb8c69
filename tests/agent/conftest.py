"""Fixtures for the agent tests: a real pykata-agent (subprocess) on this host, real crun, a busybox rootfs.

The agent runs as `python -m pykata.agent --listen unix:...` inside `unshare --mount --uts`, so its
storage mounts and host name changes stay in its own namespaces. On a host with the hybrid cgroup
layout (v1 controllers plus an empty cgroup2 at /sys/fs/cgroup/unified), crun 1.8 refuses to run
("cgroups in hybrid mode not supported"); a tmpfs over /sys/fs/cgroup/unified in the agent's mount
namespace makes crun (and the agent) use the v1 controllers. The guest has pure cgroup v2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pykata.protocols.agent import AGENT_SERVICE, agent_pb2
from pykata.ttrpc import Client, Code, RpcError, connect_unix

CGROUP_ROOT = Path("/sys/fs/cgroup")
BUSYBOX = Path("/bin/busybox")
CRUN = shutil.which("crun")


def cgroup_version() -> int:
    return 2 if (CGROUP_ROOT / "cgroup.controllers").exists() else 1


def _hybrid() -> bool:
    controllers = CGROUP_ROOT / "unified/cgroup.controllers"
    return cgroup_version() == 1 and controllers.exists() and bool(controllers.read_text().split())


def cgroup_dirs(parent: str, cid: str = "") -> list[Path]:
    """The container's cgroup directories (one per v1 controller, or one v2 directory)."""
    rel = f"{parent}/{cid}".strip("/")
    if cgroup_version() == 2:
        return [CGROUP_ROOT / rel]
    return [d / rel for d in sorted(CGROUP_ROOT.iterdir()) if d.is_dir() and d.name != "unified"
            and not d.is_symlink()]


def cgroup_file(parent: str, cid: str, v1: tuple[str, str], v2: str) -> Path:
    if cgroup_version() == 2:
        return CGROUP_ROOT / parent / cid / v2
    return CGROUP_ROOT / v1[0] / parent / cid / v1[1]


def make_busybox_rootfs(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            os.symlink("busybox", root / "bin" / applet)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root", "home/tester"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\ntester:x:1000:1001:tester:/home/tester:/bin/sh\n"
                                     "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\ntester:x:1001:\nnogroup:x:65534:\n")


@dataclass
class AgentEnv:
    root: Path
    socket: str
    state_dir: Path
    shared_dir: Path
    rootfs: Path
    cgroup_parent: str
    proc: subprocess.Popen[bytes]
    log: Path
    base_spec: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run in a mount namespace where crun sees the same cgroup layout as the agent."""
        inner = ["sh", "-c", 'mount -t tmpfs pykata-test /sys/fs/cgroup/unified && exec "$@"', "sh", *argv] \
            if _hybrid() else argv
        return ["unshare", "--mount", "--uts", "--propagation", "private", "--", *inner]


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while b"PYKATA_AGENT_READY" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"agent did not become ready: {log.read_text()[-3000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"agent exited: {log.read_text()[-3000:]}")
            buf += chunk


def _cleanup_cgroups(parent: str) -> list[str]:
    """Kill what is left in the test's cgroups and remove them; returns what had to be cleaned."""
    leftovers = []
    for top in cgroup_dirs(parent):
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda e: -len(e[0])):
            d = Path(dirpath)
            procs = (d / "cgroup.procs").read_text().split() if (d / "cgroup.procs").exists() else []
            for pid in procs:
                leftovers.append(f"process {pid} in {d}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            if d != top:
                leftovers.append(f"cgroup {d}")
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
    return leftovers


@pytest.fixture(scope="session")
def agent_env() -> Iterator[AgentEnv]:
    if CRUN is None or not BUSYBOX.exists():
        pytest.fail("the agent tests need crun and busybox-static (scripts/install.sh installs them)")
    if os.geteuid() != 0:
        pytest.fail("the agent tests run containers with crun and need root")
    root = Path(tempfile.mkdtemp(prefix="pka-", dir="/tmp"))  # short: unix socket paths are limited
    state, shared = root / "state", root / "shared"
    rootfs = shared / "busybox"
    make_busybox_rootfs(rootfs)
    parent = f"pykata-test-{os.getpid()}"
    spec_dir = root / "spec"
    spec_dir.mkdir()
    subprocess.run([CRUN, "spec"], cwd=spec_dir, check=True)
    base_spec = json.loads((spec_dir / "config.json").read_text())
    log = root / "agent.log"
    env = AgentEnv(root, str(root / "agent.sock"), state, shared, rootfs, parent, None, log,  # type: ignore[arg-type]
                   base_spec)
    argv = [sys.executable, "-m", "pykata.agent", "--listen", f"unix:{env.socket}", "--state-dir", str(state),
            "--shared-dir", str(shared), "--cgroup-parent", parent, "--debug"]
    with log.open("wb") as log_file:
        env.proc = subprocess.Popen(env.wrap(argv), stdout=subprocess.PIPE, stderr=log_file)
    try:
        _wait_ready(env.proc, log)
        yield env
    finally:
        env.proc.send_signal(signal.SIGTERM)
        try:
            env.proc.wait(10)
        except subprocess.TimeoutExpired:
            env.proc.kill()
            env.proc.wait()
        assert env.proc.stdout is not None
        env.proc.stdout.close()
        leftovers = []
        crun_root = state / "crun"
        if crun_root.is_dir():
            for cid in os.listdir(crun_root):
                leftovers.append(f"crun container {cid}")
                subprocess.run(env.wrap([CRUN, f"--root={crun_root}", "delete", "--force", cid]), check=False,
                               capture_output=True)
        leftovers += _cleanup_cgroups(parent)
        if os.environ.get("PYKATA_AGENT_LOG"):
            shutil.copyfile(log, os.environ["PYKATA_AGENT_LOG"])
        shutil.rmtree(root, ignore_errors=True)
        if leftovers:
            pytest.fail(f"the agent left behind: {leftovers}")


class AgentHelper:
    """A ttrpc client to the agent plus shortcuts; removes the containers it made."""

    def __init__(self, env: AgentEnv, client: Client) -> None:
        self.env = env
        self.client = client
        self.stub = client.stub(AGENT_SERVICE)
        self.created: list[str] = []

    def spec(self, args: list[str], *, env: list[str] | None = None, cwd: str = "/", terminal: bool = False,
             uid: int = 0, gid: int = 0, resources: dict[str, Any] | None = None,
             mounts: list[dict[str, Any]] | None = None, console: tuple[int, int] | None = None) -> dict[str, Any]:
        spec = json.loads(json.dumps(self.env.base_spec))
        spec["root"] = {"path": str(self.env.rootfs), "readonly": True}
        p = spec["process"]
        p.update(args=args, cwd=cwd, terminal=terminal, user={"uid": uid, "gid": gid})
        p["env"] = ["PATH=/bin", "HOME=/root", *(env or [])]
        if console:
            p["consoleSize"] = {"height": console[0], "width": console[1]}
        spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                               "options": ["nosuid", "nodev", "mode=1777"]})
        spec["mounts"].extend(mounts or [])
        if resources:
            spec["linux"]["resources"] = resources
        spec["hostname"] = "pykata-test"
        return spec

    async def create(self, cid: str, spec: dict[str, Any] | None = None, *, args: list[str] | None = None,
                     storages: list[agent_pb2.Storage] | None = None, **kw: Any) -> int:
        spec = spec if spec is not None else self.spec(args or ["true"])
        self.created.append(cid)
        resp = await self.stub.CreateContainer(agent_pb2.CreateContainerRequest(
            container_id=cid, oci_spec_json=json.dumps(spec), storages=storages or [], **kw), timeout=60)
        assert resp.pid > 0
        return int(resp.pid)

    async def start(self, cid: str) -> int:
        return int((await self.stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid),
                                                   timeout=30)).pid)

    async def read_all(self, cid: str, exec_id: str = "", stream: str = "stdout", chunk: int = 1 << 20) -> bytes:
        method = getattr(self.stub, "ReadStdout" if stream == "stdout" else "ReadStderr")
        out = bytearray()
        while True:
            resp = await method(agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, max_length=chunk),
                                timeout=60)
            if resp.eof:
                return bytes(out)
            assert resp.data, "a read that is not end of file must carry data"
            out += resp.data

    async def wait(self, cid: str, exec_id: str = "", timeout: float = 60) -> int:
        resp = await self.stub.WaitProcess(agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id),
                                           timeout=timeout)
        return int(resp.exit_status)

    async def write_stdin(self, cid: str, data: bytes, exec_id: str = "", close: bool = True) -> None:
        view = memoryview(data)
        while view:
            resp = await self.stub.WriteStdin(agent_pb2.WriteStreamRequest(
                container_id=cid, exec_id=exec_id, data=bytes(view[: 1 << 20])), timeout=30)
            view = view[resp.length:]
        if close:
            await self.close_stdin(cid, exec_id)

    async def close_stdin(self, cid: str, exec_id: str = "") -> None:
        await self.stub.CloseStdin(agent_pb2.CloseStdinRequest(container_id=cid, exec_id=exec_id), timeout=10)

    async def collect(self, cid: str, exec_id: str = "", stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Feed stdin (or close it), read both streams to the end, wait: (exit status, stdout, stderr)."""
        if stdin is None:
            await self.close_stdin(cid, exec_id)
            feeding: Any = asyncio.sleep(0)
        else:
            feeding = self.write_stdin(cid, stdin, exec_id)
        _, out, err = await asyncio.gather(feeding, self.read_all(cid, exec_id),
                                           self.read_all(cid, exec_id, "stderr"))
        return await self.wait(cid, exec_id), out, err

    async def run(self, cid: str, args: list[str] | None = None, *, spec: dict[str, Any] | None = None,
                  stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        await self.create(cid, spec if spec is not None else self.spec(args or ["true"]))
        await self.start(cid)
        return await self.collect(cid, stdin=stdin)

    async def exec(self, cid: str, exec_id: str, args: list[str], **kw: Any) -> int:
        process = agent_pb2.Process(args=args, env=kw.pop("env", ["PATH=/bin"]), cwd=kw.pop("cwd", "/"), **kw)
        resp = await self.stub.ExecProcess(agent_pb2.ExecProcessRequest(
            container_id=cid, exec_id=exec_id, process=process), timeout=60)
        return int(resp.pid)

    async def remove(self, cid: str, timeout: int = 20) -> None:
        await self.stub.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid, timeout_seconds=timeout),
                                        timeout=timeout + 30)

    async def cleanup(self) -> list[str]:
        problems = []
        for cid in self.created:
            try:
                await self.remove(cid)
            except RpcError as exc:
                if exc.code != Code.NOT_FOUND:
                    problems.append(f"{cid}: {exc}")
        return problems


@pytest.fixture
async def agent(agent_env: AgentEnv) -> AsyncIterator[AgentHelper]:
    client = await connect_unix(agent_env.socket)
    helper = AgentHelper(agent_env, client)
    try:
        yield helper
    finally:
        problems = await helper.cleanup()
        await client.close()
        left = sorted(os.listdir(agent_env.state_dir / "crun")) if (agent_env.state_dir / "crun").is_dir() else []
        assert not problems, problems
        assert not left, f"crun state left: {left}"
