"""Interop proof: pykata's ttrpc client and containerd protocol modules against Debian's real
`containerd-shim-runc-v2` (containerd 1.6), with no containerd running.

What `containerd-shim-runc-v2 ... start` needs (found by trying; containerd's runtime/v2 does the same):
- cwd = the bundle, holding config.json (read to find a pod grouping annotation) and rootfs/.
- A fifo named `log` in the bundle, opened for reading *before* start: the long-lived shim opens it
  write-only and dup2's it onto its stderr; without it the shim exits at once (leaving its socket),
  and with nobody reading it the shim blocks once the pipe is full.
- stdin at EOF: `start` reads runtime options (a serialized Any) from stdin until EOF.
- `-address` only names containerd's socket; nothing needs to listen there. The shim's own socket is
  unix:///run/containerd/s/<sha256(address/namespace/id)> (the /run/containerd part is hard-coded),
  printed on stdout and written to `<bundle>/address`.
- TTRPC_ADDRESS in the environment: where the shim forwards events (service
  containerd.services.events.ttrpc.v1.Events); containerd passes `<address>.ttrpc`.
- `delete` works out the bundle as dirname(cwd)/<id>, so the bundle directory must be named as the id;
  it reads <bundle>/runtime (written at Create), force-deletes the runc container, prints a
  DeleteResponse.
- runc state lives under /run/containerd/runc/<namespace>/<id>.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from pykata.protocols import (
    TASK_SERVICE,
    cgroups_v1_pb2,
    cgroups_v2_pb2,
    events_pb2,
    shim_pb2,
    task_types_pb2,
    ttrpc_events_pb2,
    typeurl,
)
from pykata.ttrpc import Client, Code, ConnectionClosedError, RpcError, connect_unix
from tests.shim import eventsink

SHIM = shutil.which("containerd-shim-runc-v2")
BUSYBOX = Path("/bin/busybox")
SHIM_SOCKET_DIR = Path("/run/containerd/s")
RUNC_ROOT = Path("/run/containerd/runc")



@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    # scripts/install.sh installs all of these: their absence is a broken setup, not a reason to skip
    if SHIM is None or shutil.which("runc") is None or not BUSYBOX.exists() or os.geteuid() != 0:
        pytest.fail("needs root, containerd-shim-runc-v2, runc and busybox-static (scripts/install.sh)")


class EventSink(eventsink.EventSink):
    """containerd's side of the shim's event channel: records each forwarded envelope."""

    def topics(self) -> list[str]:
        return [e.topic for e in self.envelopes]

    async def wait_for(self, topic: str, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                for e in self.envelopes:
                    if e.topic == topic:
                        return e
                self.arrived.clear()
                await self.arrived.wait()


@dataclass
class RuncShim:
    """One real runc shim, started the way containerd starts it; `stop()` leaves nothing behind."""

    workdir: Path
    namespace: str
    id: str
    bundle: Path = field(init=False)
    address: str = field(init=False)  # containerd's socket (nobody listens)
    socket: Path | None = None  # the shim's ttrpc socket
    pid: int | None = None  # the long-lived shim process
    log_lines: list[str] = field(default_factory=list)
    _log_task: asyncio.Task[None] | None = None
    _log_fd: int | None = None

    def __post_init__(self) -> None:
        self.bundle = self.workdir / self.namespace / self.id
        self.address = str(self.workdir / "containerd.sock")

    def write_bundle(self, args: list[str]) -> None:
        """An OCI bundle from `runc spec` with a busybox-static rootfs running `args`."""
        self.bundle.mkdir(parents=True)
        subprocess.run(["runc", "spec"], cwd=self.bundle, check=True)
        (self.bundle / "rootfs/bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, self.bundle / "rootfs/bin/busybox")
        spec = json.loads((self.bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = args
        (self.bundle / "config.json").write_text(json.dumps(spec))

    async def start(self, ttrpc_address: str) -> str:
        """Run `containerd-shim-runc-v2 start`; returns the shim's ttrpc address."""
        assert SHIM is not None
        log = self.bundle / "log"
        os.mkfifo(log, 0o700)
        # O_RDWR as containerd does: the open never blocks and we never see EOF between writers.
        self._log_fd = os.open(log, os.O_RDWR | os.O_NONBLOCK)
        self._log_task = asyncio.get_running_loop().create_task(self._drain_log(self._log_fd))
        proc = await asyncio.create_subprocess_exec(
            SHIM, "-namespace", self.namespace, "-address", self.address,
            "-publish-binary", "/usr/bin/containerd", "-id", self.id, "start",
            cwd=self.bundle, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "TTRPC_ADDRESS": ttrpc_address},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        # Find the daemon before judging the result, so that stop() can kill it on every path.
        self.pid = self._find_daemon()
        assert proc.returncode == 0, f"shim start failed: {err.decode()!r}"
        address = out.decode().strip()
        assert address.startswith(f"unix://{SHIM_SOCKET_DIR}/"), address
        self.socket = Path(address.removeprefix("unix://"))
        return address

    async def _drain_log(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                with contextlib.suppress(BlockingIOError):
                    self.log_lines.extend(os.read(fd, 65536).decode(errors="replace").splitlines())
        finally:
            loop.remove_reader(fd)

    def _find_daemon(self) -> int | None:
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            cmd = p.info["cmdline"] or []
            if (cmd and cmd[0].endswith("containerd-shim-runc-v2") and self.id in cmd
                    and "start" not in cmd and "delete" not in cmd
                    and p.info["status"] != psutil.STATUS_ZOMBIE):
                return int(p.info["pid"])
        return None

    def daemon_alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    async def wait_daemon_gone(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.daemon_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.daemon_alive()

    async def delete_cmd(self) -> shim_pb2.DeleteResponse:
        """`containerd-shim-runc-v2 delete`: containerd's cleanup after a shim is gone."""
        assert SHIM is not None
        proc = await asyncio.create_subprocess_exec(
            SHIM, "-namespace", self.namespace, "-address", self.address,
            "-publish-binary", "/usr/bin/containerd", "-id", self.id, "-bundle", str(self.bundle),
            "delete", cwd=self.bundle, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, f"shim delete failed: {err.decode()!r}"
        return shim_pb2.DeleteResponse.FromString(out)

    async def stop(self) -> None:
        """Kill whatever is left (shim, container, runc state, socket). Idempotent; never raises."""
        if self.daemon_alive():
            assert self.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await self.wait_daemon_gone(5)
        if (self.bundle / "runtime").exists():
            with contextlib.suppress(Exception):
                await self.delete_cmd()
        subprocess.run(["runc", "--root", str(RUNC_ROOT / self.namespace), "delete", "--force", self.id],
                       capture_output=True, check=False)
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)
        # runc's per-namespace state directory; the namespace is ours alone. Not empty -> left for
        # a person to see (and the assertions below fail).
        with contextlib.suppress(OSError):
            (RUNC_ROOT / self.namespace).rmdir()
        if self._log_task is not None:
            self._log_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._log_task
            self._log_task = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None


async def shutdown(client: Client, shim_id: str) -> None:
    """Task.Shutdown; the shim may exit before its answer is out, which containerd also accepts
    (runtime/v2/shim.go ignores ttrpc.ErrClosed here)."""
    with contextlib.suppress(ConnectionClosedError):
        await client.call(TASK_SERVICE, "Shutdown", shim_pb2.ShutdownRequest(id=shim_id), timeout=5.0)


async def output_seen(path: Path, text: str, timeout: float = 60.0) -> None:
    """Until `text` is in `path` (a container's output file); fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never reached {path}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def events(tmp_path: Path) -> AsyncIterator[tuple[EventSink, str]]:
    path = str(tmp_path / "containerd.sock.ttrpc")
    async with eventsink.serve_events(EventSink(), path) as sink:
        yield sink, path


@pytest.fixture
async def runc_shim(tmp_path: Path) -> AsyncIterator[RuncShim]:
    shim = RuncShim(tmp_path, f"pykata-it-{uuid.uuid4().hex[:8]}", f"it-{uuid.uuid4().hex[:12]}")
    try:
        yield shim
    finally:
        await shim.stop()
        assert not shim.daemon_alive(), "runc shim survived its teardown"
        assert shim.socket is None or not shim.socket.exists()
        assert not (RUNC_ROOT / shim.namespace).exists(), "runc state left behind"


async def test_connect_and_state_without_container(runc_shim: RuncShim,
                                                   events: tuple[EventSink, str]) -> None:
    runc_shim.write_bundle(["/bin/busybox", "true"])
    address = await runc_shim.start(events[1])
    assert (runc_shim.bundle / "address").read_text() == address
    async with await connect_unix(address) as client:
        connected = await client.call(TASK_SERVICE, "Connect", shim_pb2.ConnectRequest(id=runc_shim.id),
                                      timeout=5.0)
        assert connected.shim_pid == runc_shim.pid
        assert connected.task_pid == 0
        with pytest.raises(RpcError) as info:
            await client.call(TASK_SERVICE, "State", shim_pb2.StateRequest(id=runc_shim.id), timeout=5.0)
        # errdefs.ErrNotFound -> codes.NotFound, "container not created"
        assert info.value.code == Code.NOT_FOUND
        assert "not created" in info.value.message
        await shutdown(client, runc_shim.id)
    assert await runc_shim.wait_daemon_gone(), runc_shim.log_lines
    assert runc_shim.socket is not None and not runc_shim.socket.exists()


async def test_container_lifecycle_through_real_runc_shim(
    runc_shim: RuncShim, events: tuple[EventSink, str], tmp_path: Path
) -> None:
    sink, ttrpc_address = events
    runc_shim.write_bundle(["/bin/busybox", "sh", "-c", "echo hello-from-runc; exec /bin/busybox sleep 60"])
    address = await runc_shim.start(ttrpc_address)
    stdout = tmp_path / "stdout"
    cid = runc_shim.id
    async with await connect_unix(address) as client:
        task = client.stub(TASK_SERVICE)
        created = await task.Create(shim_pb2.CreateTaskRequest(
            id=cid, bundle=str(runc_shim.bundle), stdout=f"file://{stdout}", stderr=f"file://{stdout}",
        ), timeout=20.0)
        assert created.pid > 0
        state = await task.State(shim_pb2.StateRequest(id=cid), timeout=5.0)
        assert (state.status, state.pid, state.bundle) == (task_types_pb2.CREATED, created.pid,
                                                             str(runc_shim.bundle))

        started = await task.Start(shim_pb2.StartRequest(id=cid), timeout=10.0)
        assert started.pid == created.pid
        state = await task.State(shim_pb2.StateRequest(id=cid), timeout=5.0)
        assert state.status == task_types_pb2.RUNNING

        pids = await task.Pids(shim_pb2.PidsRequest(id=cid), timeout=5.0)
        assert created.pid in [p.pid for p in pids.processes]

        # Stats is an Any whose type URL is the cgroups metrics message's bare name.
        stats = (await task.Stats(shim_pb2.StatsRequest(id=cid), timeout=5.0)).stats
        if typeurl.is_type(stats, cgroups_v1_pb2.Metrics):
            v1 = typeurl.unpack(stats, cgroups_v1_pb2.Metrics)
            assert v1.pids.current >= 1
            assert v1.memory.usage.usage > 0
        else:
            v2 = typeurl.unpack(stats, cgroups_v2_pb2.Metrics)
            assert v2.pids.current >= 1
            assert v2.memory.usage > 0

        connected = await task.Connect(shim_pb2.ConnectRequest(id=cid), timeout=5.0)
        assert (connected.shim_pid, connected.task_pid) == (runc_shim.pid, created.pid)

        # Start returns once the process exists, not once its shell has run `echo` (nor the shim copied
        # the line to the file): under load a kill sent now can come first and the output is empty
        await output_seen(stdout, "hello-from-runc")
        await task.Kill(shim_pb2.KillRequest(id=cid, signal=signal.SIGKILL), timeout=5.0)
        waited = await task.Wait(shim_pb2.WaitRequest(id=cid), timeout=10.0)
        assert waited.exit_status == 128 + signal.SIGKILL
        assert waited.exited_at.seconds > 0
        state = await task.State(shim_pb2.StateRequest(id=cid), timeout=5.0)
        assert (state.status, state.exit_status) == (task_types_pb2.STOPPED, 137)

        deleted = await task.Delete(shim_pb2.DeleteRequest(id=cid), timeout=10.0)
        assert (deleted.pid, deleted.exit_status) == (created.pid, 137)
        assert "hello-from-runc" in stdout.read_text()

        # Events reach "containerd" as Envelopes holding containerd.events.* with bare type URLs.
        exit_env = await sink.wait_for("/tasks/exit")
        assert exit_env.namespace == runc_shim.namespace
        assert exit_env.event.type_url == "containerd.events.TaskExit"
        exit_event = typeurl.unpack(exit_env.event, events_pb2.TaskExit)
        assert (exit_event.container_id, exit_event.pid, exit_event.exit_status) == (cid, created.pid, 137)
        await sink.wait_for("/tasks/delete")
        assert isinstance(exit_env, ttrpc_events_pb2.Envelope)
        create_event = typeurl.unpack((await sink.wait_for("/tasks/create")).event, events_pb2.TaskCreate)
        assert create_event.bundle == str(runc_shim.bundle) and create_event.pid == created.pid
        assert sink.topics()[:2] == ["/tasks/create", "/tasks/start"]

        await shutdown(client, cid)
    assert await runc_shim.wait_daemon_gone(), runc_shim.log_lines
    assert runc_shim.socket is not None and not runc_shim.socket.exists()

    # containerd's cleanup step after a shim exits: `delete` prints a DeleteResponse.
    cleanup = await runc_shim.delete_cmd()
    assert cleanup.exit_status == 128 + signal.SIGKILL
    assert not (RUNC_ROOT / runc_shim.namespace / cid).exists()
