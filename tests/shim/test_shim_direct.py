"""The shim driven directly over ttrpc, the way containerd drives it, with no containerd: so that
requests can race on purpose and every event can be checked. A real ttrpc events server stands in
for containerd's (it only records), the rest is real: `start`, the VM, the agent, `delete`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import termios
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pykata.config import load_config
from pykata.images import ImageStore
from pykata.protocols import TASK_SERVICE, events_pb2, shim_pb2, task_types_pb2, typeurl
from pykata.sandbox import build_spec, sandboxes_dir
from pykata.shim import forkclient
from pykata.ttrpc import Client, Code, ConnectionClosedError, RpcError, connect_unix
from tests.shim import eventsink
from tests.shim.harness import SHIM

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]


class EventSink(eventsink.EventSink):
    """containerd's side of Events.Forward: records every envelope."""

    def of(self, cid: str) -> list[tuple[str, Any]]:
        out = []
        for env in self.envelopes:
            cls = {"/tasks/create": events_pb2.TaskCreate, "/tasks/start": events_pb2.TaskStart,
                   "/tasks/exit": events_pb2.TaskExit, "/tasks/delete": events_pb2.TaskDelete,
                   "/tasks/exec-added": events_pb2.TaskExecAdded, "/tasks/exec-started": events_pb2.TaskExecStarted,
                   "/tasks/paused": events_pb2.TaskPaused, "/tasks/resumed": events_pb2.TaskResumed,
                   "/tasks/oom": events_pb2.TaskOOM}[env.topic]
            ev = typeurl.unpack(env.event, cls)
            if ev.container_id == cid:
                out.append((env.topic, ev))
        return out

    async def wait_for(self, cid: str, topic: str, count: int = 1, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while sum(t == topic for t, _ in self.of(cid)) < count:
                self.arrived.clear()
                await self.arrived.wait()


class DirectShim:
    """One containerd-shim-pykata-v2 started with `start` in a bundle of ours."""

    def __init__(self, workdir: Path, rootfs: Path, events_address: str) -> None:
        self.namespace = f"direct-{uuid.uuid4().hex[:6]}"
        self.id = f"d-{uuid.uuid4().hex[:10]}"
        self.bundle = workdir / self.id
        self.address = str(workdir / "containerd.sock")  # nobody listens: only names the shim's socket
        self.events_address = events_address
        self.rootfs = rootfs
        self.pid: int | None = None
        self.socket = ""
        self._log_fd: int | None = None

    def write_bundle(self, args: list[str]) -> None:
        (self.bundle / "rootfs").mkdir(parents=True)
        spec = build_spec(args, env=["PATH=/bin:/usr/bin:/sbin"], hostname="direct")
        spec["linux"]["resources"] = {}
        (self.bundle / "config.json").write_text(json.dumps(spec))
        os.mkfifo(self.bundle / "log")
        self._log_fd = os.open(self.bundle / "log", os.O_RDWR | os.O_NONBLOCK)  # as containerd holds it

    def _argv(self, *extra: str) -> list[str]:
        return [str(SHIM), "-namespace", self.namespace, "-address", self.address, "-publish-binary",
                "/usr/bin/containerd", "-id", self.id, *extra]

    async def start(self) -> Client:
        proc = await asyncio.create_subprocess_exec(
            *self._argv("start"), cwd=self.bundle, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env={**os.environ, "TTRPC_ADDRESS": self.events_address})
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        self.pid = int((self.bundle / "shim.pid").read_text())
        assert proc.returncode == 0, out
        self.socket = out.decode()
        assert self.socket.startswith("unix://") and (self.bundle / "address").read_text() == self.socket
        return await connect_unix(self.socket)

    def create_request(self, work: Path) -> shim_pb2.CreateTaskRequest:
        upper, wd = work / "upper", work / "work"
        upper.mkdir(parents=True)
        wd.mkdir()
        req = shim_pb2.CreateTaskRequest(id=self.id, bundle=str(self.bundle))
        req.rootfs.add(type="overlay", source="overlay",
                       options=[f"lowerdir={self.rootfs}", f"upperdir={upper}", f"workdir={wd}"])
        return req

    def alive(self) -> bool:
        try:
            return self.pid is not None and psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    async def wait_gone(self, timeout: float = 30) -> bool:
        async with asyncio.timeout(timeout):
            while self.alive():
                await asyncio.sleep(0.05)
        return True

    async def cleanup(self) -> None:
        """Kill what is left and run `delete` as containerd would. Never raises."""
        if self.alive():
            assert self.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await self.wait_gone(10)
        if self.bundle.exists():
            proc = await asyncio.create_subprocess_exec(*self._argv("-bundle", str(self.bundle), "delete"),
                                                        cwd=self.bundle, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            await asyncio.wait_for(proc.communicate(), 30)
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        # the shims' fork server for our (fake) containerd address: it would end ~1 s after its last shim
        await asyncio.to_thread(forkclient.stop, load_config().runtime.runtime_dir, self.address)


def _leftovers(sandbox_id: str) -> list[str]:
    d = sandboxes_dir(load_config()) / sandbox_id
    procs = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
             if f"pykata-{sandbox_id}," in " ".join(p.info["cmdline"] or [])
             or f"{d}/" in " ".join(p.info["cmdline"] or [])]
    mounts = [ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {d}" in ln]
    return procs + mounts + ([str(d)] if d.exists() else [])


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ImageStore(tmp_path_factory.mktemp("cache")).resolve("busybox").rootfs


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[tuple[EventSink, str]]:
    path = str(tmp_path / "containerd.sock.ttrpc")
    async with eventsink.serve_events(EventSink(), path) as s:
        yield s, path


@pytest.fixture
async def shim(tmp_path: Path, rootfs: Path, sink: tuple[EventSink, str]) -> AsyncIterator[DirectShim]:
    s = DirectShim(tmp_path, rootfs, sink[1])
    try:
        yield s
    finally:
        await s.cleanup()
        assert not s.alive()
        assert not _leftovers(s.id), _leftovers(s.id)


async def _call(client: Client, rpc: str, req: Any, timeout: float = 60) -> Any:
    return await client.call(TASK_SERVICE, rpc, req, timeout=timeout)


async def _outcome(aw: Any) -> str:
    try:
        await aw
        return "ok"
    except ConnectionClosedError:
        return "closed"
    except RpcError as e:
        return e.code.name


async def test_racing_kill_delete_shutdown(shim: DirectShim, sink: tuple[EventSink, str], tmp_path: Path) -> None:
    events, _ = sink
    shim.write_bundle(["sleep", "1000"])
    client = await shim.start()
    async with client:
        created = await _call(client, "Create", shim.create_request(tmp_path / "ovl"), timeout=120)
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
        waits = [asyncio.ensure_future(_call(client, "Wait", shim_pb2.WaitRequest(id=shim.id), timeout=None))
                 for _ in range(3)]
        burst = [*(_call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9, all=i % 2 == 0))
                   for i in range(6)),
                 *(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)) for _ in range(3))]
        outcomes = await asyncio.gather(*(_outcome(c) for c in burst))
        # a Kill that comes after the exit is NOT_FOUND ("already finished"); nothing else fails
        assert set(outcomes[:6]) <= {"ok", "NOT_FOUND"} and outcomes[:6].count("ok") >= 1, outcomes
        assert outcomes[6:] == ["ok"] * 3  # Shutdown with a container left: the shim stays
        for w in waits:
            resp = await asyncio.wait_for(w, 30)
            assert resp.exit_status == 137 and resp.exited_at.seconds > 0
        state = await _call(client, "State", shim_pb2.StateRequest(id=shim.id))
        assert (state.status, state.exit_status, state.pid) == (task_types_pb2.STOPPED, 137, created.pid)

        deletes = await asyncio.gather(
            *(_outcome(_call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))) for _ in range(4)),
            *(_outcome(_call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9))) for _ in range(2)))
        assert sorted(deletes[:4]) == ["NOT_FOUND"] * 3 + ["ok"], deletes
        assert deletes[4:] == ["NOT_FOUND"] * 2
        # the shim is still there (nobody said Shutdown since), its VM is not
        assert shim.alive()
        shutdowns = await asyncio.gather(
            *(_outcome(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id))) for _ in range(3)))
        assert set(shutdowns) <= {"ok", "closed"}, shutdowns
    assert await shim.wait_gone()
    assert not _leftovers(shim.id)
    topics = [t for t, _ in events.of(shim.id)]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics
    assert events.of(shim.id)[2][1].exit_status == 137


async def test_vm_death_answers_every_wait(shim: DirectShim, sink: tuple[EventSink, str], tmp_path: Path) -> None:
    events, _ = sink
    shim.write_bundle(["sleep", "1000"])
    client = await shim.start()
    async with client:
        await _call(client, "Create", shim.create_request(tmp_path / "ovl"), timeout=120)
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
        spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, {"args": ["sleep", "1000"], "cwd": "/"})
        await _call(client, "Exec", shim_pb2.ExecProcessRequest(id=shim.id, exec_id="e1", spec=spec))
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id, exec_id="e1"))
        waits = [asyncio.ensure_future(_call(client, "Wait", shim_pb2.WaitRequest(id=shim.id, exec_id=e),
                                             timeout=None)) for e in ("", "e1", "")]
        record = json.loads((sandboxes_dir(load_config()) / shim.id / "state.json").read_text())
        os.kill(record["vmm_pid"], signal.SIGKILL)
        for w in waits:
            assert (await asyncio.wait_for(w, 30)).exit_status == 137
        await events.wait_for(shim.id, "/tasks/exit", count=2)
        exits = {ev.id: ev.exit_status for t, ev in events.of(shim.id) if t == "/tasks/exit"}
        assert exits == {shim.id: 137, "e1": 137}
        with pytest.raises(RpcError) as info:
            await _call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9))
        assert info.value.code == Code.NOT_FOUND
        assert (await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id, exec_id="e1"))).exit_status == 137
        assert (await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))).exit_status == 137
        await _outcome(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)))
    assert await shim.wait_gone()
    assert not _leftovers(shim.id)


async def test_hang_up_mid_delete_still_ends_the_shim(shim: DirectShim, tmp_path: Path) -> None:
    """containerd closing its connection while a Delete runs (it does when a racing Delete got
    NOT_FOUND) must not cut the deletion in half; the `delete` command then ends the shim."""
    # output nobody reads keeps Delete waiting for it (up to 2 s): long enough to hang up meanwhile
    shim.write_bundle(["sh", "-c", "head -c 1000000 /dev/zero; sleep 1000"])
    f = _fifos(tmp_path, "unread-out")
    client = await shim.start()
    req = shim.create_request(tmp_path / "ovl")
    req.stdout = str(f["unread-out"])
    await _call(client, "Create", req, timeout=120)
    await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
    await _pipe_full(f["unread-out"])  # a fixed sleep let a loaded host kill `head` before it wrote
    await _call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9))
    await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id))
    pending = asyncio.ensure_future(_outcome(_call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))))
    await asyncio.sleep(0.2)
    await client.close()
    assert await pending == "closed"
    again = await connect_unix(shim.socket)
    async with again:
        assert await _outcome(_call(again, "Delete", shim_pb2.DeleteRequest(id=shim.id))) == "NOT_FOUND"
        await _outcome(_call(again, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)))
    assert await shim.wait_gone()
    assert not _leftovers(shim.id)



def _qemu_of(sandbox_id: str) -> bool:
    return any(f"pykata-{sandbox_id}," in " ".join(p.info["cmdline"] or [])
               for p in psutil.process_iter(["cmdline"]))


async def test_create_given_up_mid_boot_still_ends_the_shim(shim: DirectShim, tmp_path: Path) -> None:
    """containerd gives up on a Create that outlasts its caller's deadline (a CRI RunPodSandbox under
    load): it hangs up, which cancels the Create while the VM boots, and runs `delete`, whose one
    Shutdown comes while the half-booted VM is still being torn down. The shim must end once that is
    done: it stayed, with nothing to serve, and nobody ever said Shutdown again (churn with virtio-fs
    pods at load 20 left one idle shim per such pod)."""
    shim.write_bundle(["sleep", "1000"])
    client = await shim.start()
    create = asyncio.ensure_future(_outcome(_call(client, "Create", shim.create_request(tmp_path / "ovl"),
                                                  timeout=120)))
    async with asyncio.timeout(60):
        while not _qemu_of(shim.id):  # the VM is booting
            assert not create.done(), await create
            await asyncio.sleep(0.01)
    await client.close()
    assert await create == "closed"
    # what `delete` sends (containerd runs it right after the hang-up), while the Create's teardown of
    # the VM is not over; `delete` sends no other (the fixture's cleanup runs it again, as containerd
    # would only for a dead shim)
    again = await connect_unix(shim.socket)
    async with again:
        assert await _outcome(_call(again, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id))) in {"ok", "closed"}
    assert await shim.wait_gone(60)
    assert not _leftovers(shim.id)


async def test_delete_command_after_a_killed_shim(shim: DirectShim, tmp_path: Path) -> None:
    shim.write_bundle(["sleep", "1000"])
    client = await shim.start()
    async with client:
        created = await _call(client, "Create", shim.create_request(tmp_path / "ovl"), timeout=120)
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
    assert _leftovers(shim.id)
    assert shim.pid is not None
    os.kill(shim.pid, signal.SIGKILL)
    await shim.wait_gone()
    proc = await asyncio.create_subprocess_exec(*shim._argv("-bundle", str(shim.bundle), "delete"),
                                                cwd=shim.bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    resp = shim_pb2.DeleteResponse.FromString(out)
    assert (resp.exit_status, resp.pid) == (137, created.pid) and resp.exited_at.seconds > 0
    assert not _leftovers(shim.id)
    assert not Path(shim.socket.removeprefix("unix://")).exists()


async def _pipe_full(fifo: Path, *, timeout: float = 60) -> None:
    """Wait until the FIFO holds a full pipe of output nobody reads (FIONREAD: nothing is consumed)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with asyncio.timeout(timeout):
            while True:
                pending = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
                if int.from_bytes(pending, "little") >= 65536:
                    return
                await asyncio.sleep(0.05)
    finally:
        os.close(fd)


def _fifos(tmp: Path, *names: str) -> dict[str, Path]:
    out = {}
    for n in names:
        out[n] = tmp / n
        os.mkfifo(out[n])
    return out


async def _read_to_eof(path: Path) -> bytes:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()
    return await asyncio.to_thread(read)


async def _read_lines(path: Path, first_line: asyncio.Future[bytes]) -> bytes:
    """Everything until the end; `first_line` gets the first line as soon as it is there."""
    loop = asyncio.get_running_loop()

    def read() -> bytes:
        with open(path, "rb") as f:
            line = f.readline()
            loop.call_soon_threadsafe(first_line.set_result, line)
            return line + f.read()
    return await asyncio.to_thread(read)


async def test_exec_tty_resize_close_io_update_stats_pids(shim: DirectShim, sink: tuple[EventSink, str],
                                                          tmp_path: Path) -> None:
    events, _ = sink
    shim.write_bundle(["sleep", "1000"])
    client = await shim.start()
    async with client:
        await _call(client, "Create", shim.create_request(tmp_path / "ovl"), timeout=120)
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))

        # a terminal exec gets the size asked for before it started
        f = _fifos(tmp_path, "tty-out")
        out = asyncio.ensure_future(_read_to_eof(f["tty-out"]))
        spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, {"args": ["sh", "-c", "stty size; tty"], "cwd": "/",
                                                           "terminal": True})
        await _call(client, "Exec", shim_pb2.ExecProcessRequest(id=shim.id, exec_id="t1", spec=spec, terminal=True,
                                                                stdout=str(f["tty-out"])))
        await _call(client, "ResizePty", shim_pb2.ResizePtyRequest(id=shim.id, exec_id="t1", width=132, height=50))
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id, exec_id="t1"))
        assert (await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id, exec_id="t1"))).exit_status == 0
        assert (await asyncio.wait_for(out, 20)).replace(b"\r", b"").split(b"\n")[:2] == [b"50 132", b"/dev/pts/0"]
        await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id, exec_id="t1"))

        # CloseIO ends stdin although containerd's writer stays open
        f = _fifos(tmp_path, "cat-in", "cat-out")
        out = asyncio.ensure_future(_read_to_eof(f["cat-out"]))
        spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, {"args": ["cat"], "cwd": "/"})
        await _call(client, "Exec", shim_pb2.ExecProcessRequest(id=shim.id, exec_id="c1", spec=spec,
                                                                stdin=str(f["cat-in"]), stdout=str(f["cat-out"])))
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id, exec_id="c1"))
        writer = await asyncio.to_thread(os.open, f["cat-in"], os.O_WRONLY)
        try:
            os.write(writer, b"through stdin\n")
            pids = await _call(client, "Pids", shim_pb2.PidsRequest(id=shim.id))
            details = [p for p in pids.processes if p.info.type_url]
            assert len(pids.processes) == 2 and len(details) == 1
            await asyncio.sleep(0.5)
            await _call(client, "CloseIO", shim_pb2.CloseIORequest(id=shim.id, exec_id="c1", stdin=True))
            assert (await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id, exec_id="c1"))).exit_status == 0
        finally:
            os.close(writer)
        assert await asyncio.wait_for(out, 20) == b"through stdin\n"
        await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id, exec_id="c1"))

        # an exec without stdin: a short one's exit comes with its output (one WaitProcess), a long
        # one still streams (its first line is there while it runs), a big one's output is whole
        for exec_id, script, want_status in (("s1", "echo out; echo err >&2; exit 3", 3),
                                             ("s2", "echo first; sleep 3; echo second", 0),
                                             ("s3", "head -c 2500000 /dev/zero; echo end >&2", 0)):
            f = _fifos(tmp_path, f"{exec_id}-out", f"{exec_id}-err")
            err = asyncio.ensure_future(_read_to_eof(f[f"{exec_id}-err"]))
            first_line = asyncio.get_running_loop().create_future()
            out = asyncio.ensure_future(_read_lines(f[f"{exec_id}-out"], first_line))
            spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, {"args": ["sh", "-c", script], "cwd": "/"})
            await _call(client, "Exec", shim_pb2.ExecProcessRequest(
                id=shim.id, exec_id=exec_id, spec=spec, stdout=str(f[f"{exec_id}-out"]),
                stderr=str(f[f"{exec_id}-err"])))
            await _call(client, "Start", shim_pb2.StartRequest(id=shim.id, exec_id=exec_id))
            if exec_id == "s2":  # the first line comes while it sleeps, not at its exit
                assert await asyncio.wait_for(first_line, 20) == b"first\n"
                state = await _call(client, "State", shim_pb2.StateRequest(id=shim.id, exec_id="s2"))
                assert state.status == task_types_pb2.RUNNING
            assert (await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id, exec_id=exec_id))).exit_status \
                == want_status
            got_out, got_err = await asyncio.wait_for(asyncio.gather(out, err), 20)
            assert (len(got_out), got_out[:16], got_err) == {
                "s1": (4, b"out\n", b"err\n"), "s2": (13, b"first\nsecond\n", b""),
                "s3": (2500000, bytes(16), b"end\n")}[exec_id]
            await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id, exec_id=exec_id))

        limit = 96 << 20
        await _call(client, "Update", shim_pb2.UpdateTaskRequest(id=shim.id, resources=typeurl.pack_json(
            typeurl.OCI_LINUX_RESOURCES_URL, {"memory": {"limit": limit}})))
        stats = (await _call(client, "Stats", shim_pb2.StatsRequest(id=shim.id))).stats
        from pykata.protocols import cgroups_v2_pb2

        metrics = typeurl.unpack(stats, cgroups_v2_pb2.Metrics)
        assert metrics.memory.usage_limit == limit and metrics.memory.usage > 0 and metrics.pids.current >= 1
        with pytest.raises(RpcError) as info:
            await _call(client, "Update", shim_pb2.UpdateTaskRequest(id=shim.id))
        assert info.value.code == Code.INVALID_ARGUMENT and "resources" in info.value.message

        await _call(client, "Pause", shim_pb2.PauseRequest(id=shim.id))
        assert (await _call(client, "State", shim_pb2.StateRequest(id=shim.id))).status == task_types_pb2.PAUSED
        with pytest.raises(RpcError) as info:
            await _call(client, "Pause", shim_pb2.PauseRequest(id=shim.id))
        assert info.value.code == Code.FAILED_PRECONDITION
        await _call(client, "Resume", shim_pb2.ResumeRequest(id=shim.id))
        await _call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9))
        await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id))
        await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))
        await _outcome(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)))
    assert await shim.wait_gone()
    topics = [t for t, _ in events.of(shim.id)]
    assert topics == ["/tasks/create", "/tasks/start",
                      "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                      "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                      *["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"] * 3,
                      "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"], topics


async def _read_late(path: Path) -> bytes:
    """Open a FIFO's read end without waiting for a writer (there may be none left) and read to its end."""
    def read() -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        with open(fd, "rb") as f:
            return f.read()
    return await asyncio.to_thread(read)


async def test_exec_output_waits_for_a_reader_that_opens_late(shim: DirectShim, tmp_path: Path) -> None:
    """containerd's client (containerd/cio) opens its end of an exec's output FIFOs in a goroutine and
    cancels that open right after the exec's Delete: a goroutine starved under CPU load opened them
    after the shim had written the output and closed the FIFO, and a FIFO's bytes go with its last
    descriptor: `ctr task exec ... echo` exited 0 and printed nothing (seen in test_ctr.py's
    test_kill_all_and_rm_force_with_two_containers at load 3.5). Here the reader opens its ends only
    after the exec exited and its Delete was sent, for output pumped (an exec with stdin, as ctr
    gives) and output with the exit (no stdin), small and just under a pipe's 64 KiB, printed just
    before the exit: every byte arrives. An exec whose output nobody reads is still deleted."""
    shim.write_bundle(["sleep", "1000"])
    client = await shim.start()
    async with client:
        await _call(client, "Create", shim.create_request(tmp_path / "ovl"), timeout=120)
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
        cases = [(stdin, script, want) for stdin in (True, False) for script, want in (
            ("echo out; echo err >&2", (b"out\n", b"err\n")),
            ("head -c 60000 /dev/zero; echo end; echo tail >&2", (bytes(60000) + b"end\n", b"tail\n")))]
        for n, (with_stdin, script, want) in enumerate([*cases, (True, "echo unread", None)]):
            exec_id = f"late{n}"
            f = _fifos(tmp_path, f"{exec_id}-in", f"{exec_id}-out", f"{exec_id}-err")
            spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, {"args": ["sh", "-c", script], "cwd": "/"})
            await _call(client, "Exec", shim_pb2.ExecProcessRequest(
                id=shim.id, exec_id=exec_id, spec=spec, stdin=str(f[f"{exec_id}-in"]) if with_stdin else "",
                stdout=str(f[f"{exec_id}-out"]), stderr=str(f[f"{exec_id}-err"])))
            await _call(client, "Start", shim_pb2.StartRequest(id=shim.id, exec_id=exec_id))
            if with_stdin:  # ctr's stdin (empty here) ends with CloseIO
                await _call(client, "CloseIO", shim_pb2.CloseIORequest(id=shim.id, exec_id=exec_id, stdin=True))
            assert (await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id, exec_id=exec_id))).exit_status == 0
            delete = asyncio.ensure_future(_call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id, exec_id=exec_id)))
            if want is None:  # nobody ever reads: the FIFO is closed all the same, Delete answers
                assert (await delete).exit_status == 0
                continue
            await asyncio.sleep(0.2)  # the reader comes late, as the starved goroutine did
            got = await asyncio.wait_for(asyncio.gather(_read_late(f[f"{exec_id}-out"]),
                                                        _read_late(f[f"{exec_id}-err"])), 30)
            assert (with_stdin, script, tuple(got)) == (with_stdin, script, want)
            assert (await delete).exit_status == 0
        await _call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9))
        await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id))
        await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))
        await _outcome(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)))
    assert await shim.wait_gone()


async def test_oom_kill_is_published(shim: DirectShim, sink: tuple[EventSink, str], tmp_path: Path) -> None:
    events, _ = sink
    shim.write_bundle(["sh", "-c", "dd if=/dev/zero of=/dev/null bs=128M count=1"])
    spec = json.loads((shim.bundle / "config.json").read_text())
    spec["linux"]["resources"] = {"memory": {"limit": 32 << 20}}
    (shim.bundle / "config.json").write_text(json.dumps(spec))
    client = await shim.start()
    async with client:
        await _call(client, "Create", shim.create_request(tmp_path / "ovl"), timeout=120)
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
        assert (await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id))).exit_status == 137
        await events.wait_for(shim.id, "/tasks/oom")
        await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))
        await _outcome(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)))
    assert await shim.wait_gone()


async def test_two_containers_of_a_pod_share_the_shim_and_vm(shim: DirectShim, sink: tuple[EventSink, str],
                                                             tmp_path: Path) -> None:
    events, _ = sink
    shim.write_bundle(["sleep", "1000"])
    client = await shim.start()
    # a CRI container of the same pod: its own bundle, the sandbox's id in its annotations
    second = DirectShim(tmp_path, shim.rootfs, shim.events_address)
    second.namespace, second.address = shim.namespace, shim.address
    second.write_bundle(["sh", "-c", "echo second > /shared-check; sleep 1000"])
    spec = json.loads((second.bundle / "config.json").read_text())
    spec["annotations"] = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": shim.id}
    (second.bundle / "config.json").write_text(json.dumps(spec))
    try:
        async with client:
            await _call(client, "Create", shim.create_request(tmp_path / "ovl1"), timeout=120)
            await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
            proc = await asyncio.create_subprocess_exec(
                *second._argv("start"), cwd=second.bundle, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                env={**os.environ, "TTRPC_ADDRESS": shim.events_address})
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0 and out.decode() == shim.socket  # the pod's shim, not a new one
            vm = json.loads((sandboxes_dir(load_config()) / shim.id / "state.json").read_text())["vmm_pid"]
            await _call(client, "Create", second.create_request(tmp_path / "ovl2"), timeout=120)
            await _call(client, "Start", shim_pb2.StartRequest(id=second.id))
            for cid in (shim.id, second.id):
                assert (await _call(client, "State", shim_pb2.StateRequest(id=cid))).status == task_types_pb2.RUNNING
            await _call(client, "Kill", shim_pb2.KillRequest(id=second.id, signal=9))
            await _call(client, "Wait", shim_pb2.WaitRequest(id=second.id))
            await _call(client, "Delete", shim_pb2.DeleteRequest(id=second.id))
            await _call(client, "Shutdown", shim_pb2.ShutdownRequest(id=second.id))
            assert shim.alive() and psutil.pid_exists(vm)  # the pod goes on
            # the same id again at once (the guest may still be removing the first: Create waits)
            await _call(client, "Create", second.create_request(tmp_path / "ovl3"), timeout=120)
            await _call(client, "Start", shim_pb2.StartRequest(id=second.id))
            assert (await _call(client, "State", shim_pb2.StateRequest(id=second.id))).status == task_types_pb2.RUNNING
            await _call(client, "Kill", shim_pb2.KillRequest(id=second.id, signal=9))
            await _call(client, "Wait", shim_pb2.WaitRequest(id=second.id))
            await _call(client, "Delete", shim_pb2.DeleteRequest(id=second.id))
            # its removal from the guest, and then its host mounts, follow the answer by a second
            sandbox_dir = sandboxes_dir(load_config()) / shim.id
            async with asyncio.timeout(30):
                while any(f"{sandbox_dir}/" in ln and f"/{second.id}/" in ln
                          for ln in Path("/proc/mounts").read_text().splitlines()):
                    await asyncio.sleep(0.1)
            assert (await _call(client, "State", shim_pb2.StateRequest(id=shim.id))).status == task_types_pb2.RUNNING
            await _call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9))
            await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id))
            await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))
            await _outcome(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)))
        assert await shim.wait_gone()
    finally:
        await second.cleanup()
    assert [t for t, _ in events.of(second.id)] == 2 * ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]


async def test_pod_sandbox_task_without_a_pause_process(shim: DirectShim, sink: tuple[EventSink, str],
                                                        tmp_path: Path) -> None:
    """A CRI pod's sandbox container runs nothing in the guest (pykata.shim.tasks.pauseless) while the
    shim answers for its task; an exec into it starts the real pause first; SIGKILL then ends it."""
    events, _ = sink
    shim.write_bundle(["sleep", "1000"])
    spec = json.loads((shim.bundle / "config.json").read_text())
    spec["annotations"] = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": shim.id}
    (shim.bundle / "config.json").write_text(json.dumps(spec))
    record = sandboxes_dir(load_config()) / shim.id / "state.json"
    client = await shim.start()
    async with client:
        created = await _call(client, "Create", shim.create_request(tmp_path / "ovl"), timeout=120)
        vm = json.loads(record.read_text())["vmm_pid"]
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id))
        assert json.loads(record.read_text())["containers"] == {}  # nothing made in the guest
        state = await _call(client, "State", shim_pb2.StateRequest(id=shim.id))
        assert (state.status, state.pid, created.pid) == (task_types_pb2.RUNNING, vm, vm)
        assert [p.pid for p in (await _call(client, "Pids", shim_pb2.PidsRequest(id=shim.id))).processes] == [vm]
        stats = await _call(client, "Stats", shim_pb2.StatsRequest(id=shim.id))
        assert stats.stats.type_url.endswith("io.containerd.cgroups.v2.Metrics")
        await _call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=signal.SIGHUP))  # the pause ignores it
        await _call(client, "Pause", shim_pb2.PauseRequest(id=shim.id))
        await _call(client, "Resume", shim_pb2.ResumeRequest(id=shim.id))
        assert (await _call(client, "State", shim_pb2.StateRequest(id=shim.id))).status == task_types_pb2.RUNNING

        exec_spec = typeurl.pack_json(typeurl.OCI_PROCESS_URL, {"args": ["sh", "-c", "exit 3"], "cwd": "/"})
        await _call(client, "Exec", shim_pb2.ExecProcessRequest(id=shim.id, exec_id="e1", spec=exec_spec))
        await _call(client, "Start", shim_pb2.StartRequest(id=shim.id, exec_id="e1"), timeout=120)
        assert (await _call(client, "Wait", shim_pb2.WaitRequest(id=shim.id, exec_id="e1"))).exit_status == 3
        assert set(json.loads(record.read_text())["containers"]) == {shim.id}  # the pause, made for the exec

        waits = [asyncio.ensure_future(_call(client, "Wait", shim_pb2.WaitRequest(id=shim.id), timeout=None))
                 for _ in range(2)]
        kills = await asyncio.gather(*(_outcome(_call(client, "Kill", shim_pb2.KillRequest(id=shim.id, signal=9)))
                                       for _ in range(3)))
        assert set(kills) <= {"ok", "NOT_FOUND"} and "ok" in kills, kills
        for w in waits:
            assert (await asyncio.wait_for(w, 30)).exit_status == 137
        await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id, exec_id="e1"))
        assert (await _call(client, "Delete", shim_pb2.DeleteRequest(id=shim.id))).exit_status == 137
        await _outcome(_call(client, "Shutdown", shim_pb2.ShutdownRequest(id=shim.id)))
    assert await shim.wait_gone()
    assert not _leftovers(shim.id)
    topics = [t for t, _ in events.of(shim.id)]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/resumed", "/tasks/exec-added",
                      "/tasks/exec-started", "/tasks/exit", "/tasks/exit", "/tasks/delete"], topics
