"""Unit tests of the shim's parts that need no VM: flags, sandbox grouping, socket names, metrics,
exec specs, the event publisher (against a real ttrpc server), stdio plumbing (real FIFOs, files
and a logging binary, with a fake process standing in for the agent), Task RPCs with no sandbox,
and `pykata install containerd`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from pykata.cli.install import InstallError, link_shim, plan_config
from pykata.errors import InvalidArgument, PykataError, Unavailable
from pykata.protocols import (
    EVENTS_SERVICE,
    cgroups_v1_pb2,
    cgroups_v2_pb2,
    events_pb2,
    shim_pb2,
    typeurl,
)
from pykata.protocols.agent import agent_pb2
from pykata.shim.bootstrap import delete_response, sandbox_id_of, socket_path
from pykata.shim.events import EventPublisher
from pykata.shim.flags import parse_flags
from pykata.shim.service import TaskService
from pykata.shim.starterror import ShimStartError
from pykata.shim.stats import metrics_any, to_v1, to_v2
from pykata.shim.stdio import ProcessIO, Stdio
from pykata.shim.tasks.model import exec_process
from pykata.ttrpc import CallContext, Code, Server

# -- bootstrap ------------------------------------------------------------------------------------


def test_flags_as_containerd_passes_them() -> None:
    f = parse_flags(["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock", "-publish-binary",
                     "/usr/bin/containerd", "-id", "abc", "-debug", "start"])
    assert (f.namespace, f.address, f.id, f.debug, f.action) == ("k8s.io", "/run/containerd/containerd.sock",
                                                                 "abc", True, "start")
    f = parse_flags(["--id=x", "-bundle", "/b", "delete"])
    assert (f.id, f.bundle, f.action, f.debug) == ("x", "/b", "delete", False)


@pytest.mark.parametrize("argv", [["-bogus", "x", "start"], ["-id"]])
def test_bad_flags_are_named(argv: list[str]) -> None:
    with pytest.raises(ShimStartError, match=argv[0]):
        parse_flags(argv)


def test_start_handed_to_the_fork_server_imports_no_enum() -> None:
    # `shim start` and `shim delete` run once per task: pykata.errors' IntEnum (enum + the class, ~6 ms
    # of CPU, a third of the process) is imported only when something fails; pykata.PykataError stays
    code = ("import sys; import pykata.shim.main, pykata.shim.handoff; from pykata.shim.flags import parse_flags; "
            "parse_flags(['-id', 'x', 'start']); "
            "print(sorted(m for m in ('enum', 'pykata.errors') if m in sys.modules)); "
            "import pykata; print(pykata.PykataError.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "pykata.errors"]


def test_cri_containers_join_their_sandbox_shim() -> None:
    cri = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"}
    assert sandbox_id_of("c1", cri) == "pod1"
    assert sandbox_id_of("pod1", {"io.kubernetes.cri.container-type": "sandbox",
                                  "io.kubernetes.cri.sandbox-id": "pod1"}) == "pod1"
    crio = {"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.SandboxID": "pod2"}
    assert sandbox_id_of("c2", crio) == "pod2"
    assert sandbox_id_of("solo", {}) == "solo"


def test_socket_names_are_stable_per_sandbox_and_fit() -> None:
    a = socket_path("/run/pykata", "/run/containerd/containerd.sock", "default", "c1")
    assert a == socket_path("/run/pykata", "/run/containerd/containerd.sock", "default", "c1")
    assert a != socket_path("/run/pykata", "/run/containerd/containerd.sock", "other", "c1")
    long = socket_path("/run/" + "d" * 60, "/a", "ns", "c1")
    assert len(str(long)) <= 107
    with pytest.raises(ShimStartError, match="runtime_dir"):
        socket_path("/" + "x" * 100, "/a", "ns", "c1")


@pytest.mark.parametrize("pid,status,at_ns", [
    (0, 137, 1_700_000_000_123_456_789), (4242, 0, 5), (0xFFFFFFFF, 255, 0), (1, 137, 2_000_000_000)])
def test_hand_made_delete_response_is_protobufs(pid: int, status: int, at_ns: int) -> None:
    # the `delete` subcommand serializes its answer by hand to skip compiling containerd's descriptors
    want = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    want.exited_at.FromNanoseconds(at_ns)
    got = delete_response(pid, status, at_ns)
    assert got == want.SerializeToString()
    assert shim_pb2.DeleteResponse.FromString(got) == want


def test_hand_decoded_runtime_options_are_protobufs() -> None:
    # `start` reads containerd's runtime options by hand (importing protobuf cost it ~0.1 s)
    import random

    from google.protobuf import any_pb2

    from pykata.protocols import runc_options_pb2, runtimeoptions_pb2
    from pykata.shim.bootstrap import _runtime_options

    def packed(msg: Any) -> bytes:
        wrapper = any_pb2.Any()
        wrapper.Pack(msg)
        return wrapper.SerializeToString()

    path = "/etc/pykata/x.toml"
    assert _runtime_options(packed(runtimeoptions_pb2.Options(config_path=path))) == path
    assert _runtime_options(packed(runtimeoptions_pb2.Options(type_url="t", config_path="/é/ü.toml"))) == "/é/ü.toml"
    assert _runtime_options(packed(runtimeoptions_pb2.Options())) is None
    assert _runtime_options(packed(runc_options_pb2.Options(binary_name="/x"))) is None  # another runtime's
    assert _runtime_options(b"") is None
    good = packed(runtimeoptions_pb2.Options(config_path="/c.toml"))
    rng = random.Random(7)
    for n in range(2000):  # damaged or random bytes: None, or protobuf's own reading, never an exception
        data = bytearray(good if n % 2 else rng.randbytes(rng.randrange(1, 40)))
        if n % 2:
            data[rng.randrange(len(data))] = rng.randrange(256)
            data = data[:rng.randrange(1, len(data) + 1)]
        try:
            outer = any_pb2.Any.FromString(bytes(data))
            want = (runtimeoptions_pb2.Options.FromString(outer.value).config_path or None
                    if outer.type_url.rsplit("/", 1)[-1] == "runtimeoptions.v1.Options" else None)
        except Exception:
            want = None
        assert _runtime_options(bytes(data)) in (want, None), bytes(data)


class ShutdownRecorder:
    """A fake shim Task service: records each Shutdown's id; every other method is refused."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def Shutdown(self, request: Any, ctx: CallContext) -> empty_pb2.Empty:
        self.ids.append(request.id)
        return empty_pb2.Empty()

    def __getattr__(self, name: str) -> Any:
        async def refuse(request: Any, ctx: CallContext) -> Any:
            raise Unavailable(name)
        return refuse


async def test_hand_made_shutdown_is_the_ttrpc_clients_and_reaches_the_shim(tmp_path: Path) -> None:
    # `delete` frames its Shutdown by hand (no asyncio, ttrpc client or generated messages to import)
    from pykata.protocols import TASK_SERVICE
    from pykata.shim import bootstrap
    from pykata.ttrpc import connect_unix

    path = tmp_path / "raw.sock"
    got: list[bytes] = []

    async def first_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(10)
        got.append(header + await reader.readexactly(int.from_bytes(header[:4], "big")))
        writer.close()

    raw = await asyncio.start_unix_server(first_frame, str(path))
    async with raw:
        with contextlib.suppress(PykataError, OSError):
            client = await connect_unix(str(path), timeout=1.0)
            async with client:
                await client.call(TASK_SERVICE, "Shutdown", shim_pb2.ShutdownRequest(id="c" * 64), timeout=2.0)
    assert got == [bootstrap.shutdown_request("c" * 64, 2.0)]

    shim = ShutdownRecorder()
    server = Server()
    server.register(TASK_SERVICE, shim)
    await server.serve_unix(str(tmp_path / "shim.sock"))
    try:
        await asyncio.to_thread(bootstrap._shutdown, tmp_path / "shim.sock", "c1")
        assert shim.ids == ["c1"]
        # nobody listening, or a peer that hangs up at once: `delete` goes on, quietly
        await asyncio.to_thread(bootstrap._shutdown, tmp_path / "nobody.sock", "c1")
        hangup = await asyncio.start_unix_server(lambda r, w: w.close(), str(tmp_path / "hangup.sock"))
        async with hangup:
            async with asyncio.timeout(bootstrap.SHUTDOWN_TIMEOUT):
                await asyncio.to_thread(bootstrap._shutdown, tmp_path / "hangup.sock", "c1")
    finally:
        await server.close()


# -- metrics -------------------------------------------------------------------------------------


def _stats(version: int) -> agent_pb2.CgroupStats:
    s = agent_pb2.CgroupStats(cgroup_version=version)
    s.cpu.usage_total_ns, s.cpu.usage_user_ns, s.cpu.usage_kernel_ns = 3_000_000, 2_000_000, 1_000_000
    s.cpu.per_cpu_ns.extend([1_000_000, 2_000_000])
    s.memory.usage, s.memory.limit, s.memory.oom_kill = 4096, 1 << 20, 2
    s.memory.stat["anon"] = 100
    s.memory.stat["total_cache"] = 7
    s.memory.stat["pgfault"] = 9
    s.pids.current, s.pids.limit = 3, 10
    s.io.service_bytes.add(major=8, minor=0, op="rbytes", value=512)
    s.io.serviced.add(major=8, minor=0, op="rios", value=1)
    return s


def test_v2_metrics() -> None:
    m = to_v2(_stats(2))
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (3000, 2000, 1000)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.anon, m.memory.pgfault) == (4096, 1 << 20, 100, 9)
    assert m.memory_events.oom_kill == 2 and (m.pids.current, m.pids.limit) == (3, 10)
    assert [(e.major, e.rbytes, e.rios) for e in m.io.usage] == [(8, 512, 1)]
    packed = metrics_any(_stats(2))
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    assert typeurl.unpack(packed, cgroups_v2_pb2.Metrics) == m


def test_v1_metrics_have_what_ctr_dereferences() -> None:
    m = to_v1(_stats(1))
    assert m.memory.usage.usage == 4096 and m.memory.usage.limit == 1 << 20
    assert m.memory.total_cache == 7 and m.memory.pg_fault == 9
    assert m.cpu.usage.total == 3_000_000 and list(m.cpu.usage.per_cpu) == [1_000_000, 2_000_000]
    assert metrics_any(_stats(1)).type_url == "io.containerd.cgroups.v1.Metrics"
    assert typeurl.unpack(metrics_any(_stats(1)), cgroups_v1_pb2.Metrics).pids.current == 3


# -- exec specs ----------------------------------------------------------------------------------


def test_exec_spec_to_agent_process() -> None:
    spec = {"args": ["sh", "-c", "id"], "env": ["A=1"], "cwd": "/tmp",
            "user": {"uid": 1000, "gid": 100, "additionalGids": [5], "umask": 18},
            "capabilities": {"bounding": ["CAP_KILL"]}, "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 9, "soft": 8}],
            "noNewPrivileges": True, "consoleSize": {"height": 24, "width": 80}}
    p = exec_process(spec, terminal=True, console_size=None)
    assert (list(p.args), list(p.env), p.cwd, p.terminal) == (["sh", "-c", "id"], ["A=1"], "/tmp", True)
    assert (p.user.uid, p.user.gid, list(p.user.additional_gids), p.user.umask) == (1000, 100, [5], 18)
    assert list(p.capabilities.bounding) == ["CAP_KILL"] and p.rlimits[0].soft == 8 and p.no_new_privileges
    assert (p.console_height, p.console_width) == (24, 80)
    assert exec_process(spec, terminal=True, console_size=(50, 132)).console_width == 132


@pytest.mark.parametrize(("spec", "field"), [({"args": []}, "spec.args"), ({"args": ["a"], "env": "x"}, "spec.env"),
                                             ({"args": ["a"], "user": {"uid": "x"}}, "spec.user.uid"), ("nope", "spec"),
                                             # (uid_t)-1: setresuid would leave the process root
                                             ({"args": ["a"], "user": {"uid": 4294967295}}, "spec.user.uid"),
                                             ({"args": ["a"], "user": {"uid": 5, "gid": 2**31}}, "spec.user.gid"),
                                             ({"args": ["a"], "user": {"additionalGids": [1, 4294967295]}},
                                              "spec.user.additionalGids[1]"),
                                             ({"args": ["a"], "selinuxLabel": "system_u:system_r:spc_t:s0"},
                                              "spec.selinuxLabel"),
                                             ({"args": ["a"], "apparmorProfile": "strict"}, "spec.apparmorProfile")])
def test_bad_exec_specs_name_the_field(spec: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        exec_process(spec, terminal=False, console_size=None)
    assert info.value.field == field


# -- events ---------------------------------------------------------------------------------------


class FlakyEventSink:
    """A fake of containerd's ttrpc Events service that refuses the first `failures` Forwards."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.envelopes: list[Any] = []

    async def Forward(self, request: Any, ctx: CallContext) -> empty_pb2.Empty:
        if self.failures > 0:
            self.failures -= 1
            raise Unavailable("busy")
        self.envelopes.append(request.envelope)
        return empty_pb2.Empty()


@pytest.fixture
async def flaky_sink(tmp_path: Path) -> AsyncIterator[tuple[FlakyEventSink, str]]:
    sink = FlakyEventSink(failures=2)
    server = Server()
    server.register(EVENTS_SERVICE, sink)
    path = str(tmp_path / "events.sock")
    await server.serve_unix(path)
    try:
        yield sink, path
    finally:
        await server.close()


async def test_events_arrive_in_order_despite_failures(flaky_sink: tuple[FlakyEventSink, str]) -> None:
    sink, path = flaky_sink
    pub = EventPublisher(path, "ns1", retry_delay=0.01)
    pub.start()
    pub.publish(events_pb2.TaskCreate(container_id="c", pid=1))
    pub.publish(events_pb2.TaskStart(container_id="c", pid=1))
    pub.publish(events_pb2.TaskExit(container_id="c", id="c", pid=1, exit_status=3))
    await pub.close(timeout=5)
    assert [e.topic for e in sink.envelopes] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    assert {e.namespace for e in sink.envelopes} == {"ns1"}
    assert sink.envelopes[2].event.type_url == "containerd.events.TaskExit"
    assert typeurl.unpack(sink.envelopes[2].event, events_pb2.TaskExit).exit_status == 3
    assert sink.envelopes[0].timestamp.seconds > 0 and pub.dropped == 0


async def test_publishing_never_blocks_without_containerd(tmp_path: Path) -> None:
    pub = EventPublisher(str(tmp_path / "nobody.sock"), "ns", retry_delay=0.01)
    pub.start()
    for _ in range(100):
        pub.publish(events_pb2.TaskOOM(container_id="c"))
    async with asyncio.timeout(3):
        await pub.close(timeout=0.5)


# -- stdio ----------------------------------------------------------------------------------------


class FakeProcess:
    """Stands in for pykata.sandbox.Process: scripted output, recorded stdin."""

    def __init__(self, stdout: list[bytes], stderr: list[bytes], terminal: bool = False) -> None:
        self.container_id, self.exec_id, self.terminal = "c", "", terminal
        self.out = {"stdout": list(stdout), "stderr": list(stderr)}
        self.stdin = bytearray()
        self.stdin_closed = asyncio.Event()

    async def read(self, stream: str = "stdout", max_length: int = 0) -> bytes | None:
        await asyncio.sleep(0)
        return self.out[stream].pop(0) if self.out[stream] else None

    async def write_stdin(self, data: bytes) -> None:
        self.stdin += data

    async def close_stdin(self) -> None:
        self.stdin_closed.set()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _read_fifo_to_eof(path: Path) -> bytes:
    """Read a FIFO the shim already holds open for writing, on the loop: a reader blocked in a thread
    would keep the interpreter from exiting when a failed test never closes the writer."""
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(fd, _set_once, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(fd)
                continue
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        os.close(fd)


async def test_fifo_stdio(tmp_path: Path) -> None:
    paths = {n: tmp_path / n for n in ("in", "out", "err")}
    for p in paths.values():
        os.mkfifo(p)
    pio = await ProcessIO.open(Stdio(str(paths["in"]), str(paths["out"]), str(paths["err"])),
                               container_id="c", namespace="ns")
    proc = FakeProcess([b"hello ", b"world\n"], [b"oops\n"])
    readers = [asyncio.ensure_future(_read_fifo_to_eof(paths["out"])),
               asyncio.ensure_future(_read_fifo_to_eof(paths["err"]))]
    pio.attach(proc)  # type: ignore[arg-type]

    # O_NONBLOCK: ENXIO (a failure) rather than a thread blocked forever if the shim never opened stdin.
    writer = os.open(paths["in"], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(writer, b"typed\n")
    finally:
        os.close(writer)
    async with asyncio.timeout(5):
        assert await readers[0] == b"hello world\n"
        assert await readers[1] == b"oops\n"
        await proc.stdin_closed.wait()
    assert bytes(proc.stdin) == b"typed\n"
    await pio.wait_output(1)
    await pio.close()
    await pio.close()


async def test_close_io_ends_stdin_while_the_writer_stays(tmp_path: Path) -> None:
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    pio = await ProcessIO.open(Stdio(stdin=str(fifo)), container_id="c", namespace="ns")
    proc = FakeProcess([], [])
    pio.attach(proc)  # type: ignore[arg-type]
    writer = os.open(fifo, os.O_WRONLY)
    try:
        os.write(writer, b"abc")
        async with asyncio.timeout(5):
            while bytes(proc.stdin) != b"abc":
                await asyncio.sleep(0.01)
            await pio.close_stdin()
            await proc.stdin_closed.wait()
    finally:
        os.close(writer)
        await pio.close()


async def test_file_uri_appends_both_streams(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "c.log"
    pio = await ProcessIO.open(Stdio(stdout=f"file://{log}", stderr=f"file://{log}"), container_id="c",
                               namespace="ns")
    pio.attach(FakeProcess([b"out\n"], [b"err\n"]))  # type: ignore[arg-type]
    await pio.wait_output(5)
    await pio.close()
    assert sorted(log.read_text().splitlines()) == ["err", "out"]


async def test_binary_uri_runs_the_logger_as_containerd_does(tmp_path: Path) -> None:
    logger = tmp_path / "logger.sh"
    logger.write_text("#!/bin/sh\n"
                      'echo "$CONTAINER_ID $CONTAINER_NAMESPACE $*" > "$2.env"\n'
                      # the trap is set before the logger says ready: a TERM right after it must flush too
                      "trap 'wait; exit 0' TERM  # flush what is in the pipes, as a real logger does\n"
                      'cat <&3 5>&- > "$2.out" & cat <&4 5>&- > "$2.err" &\n'
                      "exec 5>&-  # ready\n"
                      "wait\n")
    logger.chmod(logger.stat().st_mode | stat.S_IXUSR)
    base = tmp_path / "captured"
    pio = await ProcessIO.open(Stdio(stdout=f"binary://{logger}?dest={base}"), container_id="c1", namespace="ns1")
    pio.attach(FakeProcess([b"to stdout\n"], [b"to stderr\n"]))  # type: ignore[arg-type]
    await pio.wait_output(5)
    await pio.close()
    assert Path(f"{base}.env").read_text() == f"c1 ns1 dest {base}\n"
    assert Path(f"{base}.out").read_text() == "to stdout\n"
    assert Path(f"{base}.err").read_text() == "to stderr\n"


@pytest.mark.parametrize(("stdio", "field"), [(Stdio(stdout="/nonexistent/fifo"), "stdout"),
                                              (Stdio(stdout="ftp://x/y"), "stdout"),
                                              (Stdio(stdout="binary:///no/such/logger"), "stdout"),
                                              (Stdio(stdin="/nonexistent/in"), "stdin")])
async def test_unusable_stdio_is_named(stdio: Stdio, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await ProcessIO.open(stdio, container_id="c", namespace="ns")
    assert info.value.field == field


# -- Task RPCs before any sandbox ------------------------------------------------------------------


async def test_rpcs_on_unknown_tasks() -> None:
    svc = TaskService("sb", "ns", EventPublisher(None, "ns"))
    for rpc, req in (("State", shim_pb2.StateRequest(id="x")), ("Kill", shim_pb2.KillRequest(id="x", signal=9)),
                     ("Delete", shim_pb2.DeleteRequest(id="x")), ("Wait", shim_pb2.WaitRequest(id="x")),
                     ("Pids", shim_pb2.PidsRequest(id="x")), ("Stats", shim_pb2.StatsRequest(id="x"))):
        with pytest.raises(PykataError) as info:
            await getattr(svc, rpc)(req, None)
        assert info.value.rpc_code == Code.NOT_FOUND, rpc
    with pytest.raises(PykataError) as info:
        await svc.Checkpoint(shim_pb2.CheckpointTaskRequest(id="x"), None)
    assert info.value.rpc_code == Code.UNIMPLEMENTED
    connected = await svc.Connect(shim_pb2.ConnectRequest(id="x"), None)
    assert (connected.shim_pid, connected.task_pid) == (os.getpid(), 0)
    with pytest.raises(InvalidArgument):
        await svc.Create(shim_pb2.CreateTaskRequest(id="bad/id", bundle="/x"), None)


async def test_create_with_a_bad_bundle_names_config_json(tmp_path: Path) -> None:
    svc = TaskService("sb", "ns", EventPublisher(None, "ns"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument) as info:
        await svc.Create(shim_pb2.CreateTaskRequest(id="c1", bundle=str(tmp_path)), None)
    assert info.value.field == "config.json" and svc.sandbox is None and not svc.containers


async def test_repeated_and_racing_shutdowns_end_the_shim_once() -> None:
    exits: list[int] = []
    svc = TaskService("sb", "ns", EventPublisher(None, "ns"), on_exit=lambda: exits.append(1))
    await asyncio.gather(*(svc.Shutdown(shim_pb2.ShutdownRequest(id="sb"), None) for _ in range(10)))
    async with asyncio.timeout(1):
        await svc.exit_requested.wait()
    assert exits == [1]
    with pytest.raises(PykataError) as info:
        await svc.Create(shim_pb2.CreateTaskRequest(id="late", bundle="/x"), None)
    assert info.value.rpc_code == Code.FAILED_PRECONDITION
    await svc.close()
    await svc.close()


# -- install --------------------------------------------------------------------------------------


def test_install_plans(tmp_path: Path) -> None:
    new, block = plan_config(tmp_path / "missing.toml")
    assert new is not None and new.startswith("version = 2\n")
    assert 'runtime_type = "io.containerd.pykata.v2"' in block and "io.katacontainers.*" in block
    v2 = tmp_path / "v2.toml"
    v2.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n')
    new, block = plan_config(v2)
    assert new is not None and new.startswith(v2.read_text())
    v2.write_text(new)
    assert plan_config(v2)[0] is None  # already there: nothing to change
    v1 = tmp_path / "v1.toml"
    v1.write_text('[plugins.cri]\n  sandbox_image = "pause"\n')
    new, block = plan_config(v1)
    assert block.startswith("[plugins.cri.containerd.runtimes.pykata]") and new is not None
    bad = tmp_path / "bad.toml"
    bad.write_text("[[[")
    with pytest.raises(InstallError, match=r"bad\.toml"):
        plan_config(bad)
    clash = tmp_path / "clash.toml"
    clash.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]\n'
                     'runtime_type = "io.containerd.runc.v2"\n')
    with pytest.raises(InstallError, match="another runtime_type"):
        plan_config(clash)


def test_containerd_reads_the_written_config(tmp_path: Path) -> None:
    import shutil
    import subprocess

    containerd = shutil.which("containerd")
    if containerd is None:
        pytest.fail("containerd is missing (scripts/install.sh)")
    config = tmp_path / "config.toml"
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "pause"\n')
    new, _ = plan_config(config)
    assert new is not None
    config.write_text(new)
    dump = subprocess.run([containerd, "--config", str(config), "config", "dump"], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    section = dump.split('.containerd.runtimes.pykata]', 1)[1]
    assert 'runtime_type = "io.containerd.pykata.v2"' in section.split("[plugins", 1)[0]
    assert 'sandbox_image = "pause"' in dump


def test_install_link(tmp_path: Path) -> None:
    target = tmp_path / "venv-shim"
    target.write_text("#!/bin/sh\n")
    assert "->" in link_shim(tmp_path / "bin", target)
    assert (tmp_path / "bin/containerd-shim-pykata-v2").resolve() == target
    assert "(already)" in link_shim(tmp_path / "bin", target)
    (tmp_path / "bin2").mkdir()
    (tmp_path / "bin2/containerd-shim-pykata-v2").write_text("someone else's")
    with pytest.raises(InstallError, match="not a link"):
        link_shim(tmp_path / "bin2", target)


def test_log_lines_name_sandbox_and_container() -> None:
    import logging

    from pykata.shim.logs import LogfmtFormatter, current_container

    record = logging.LogRecord("pykata.shim", logging.WARNING, __file__, 1, 'said "%s"', ("hi",), None)
    token = current_container.set("c-1")
    try:
        line = LogfmtFormatter("sb-1").format(record)
    finally:
        current_container.reset(token)
    assert 'level=warning msg="said \\"hi\\""' in line
    assert "sandbox=sb-1 container=c-1" in line and line.startswith('time="')


def test_errors_are_pykata_errors() -> None:
    assert issubclass(InstallError, PykataError)


async def test_a_guest_oom_flood_never_costs_an_exit_event(flaky_sink: tuple[FlakyEventSink, str]) -> None:
    """The issue's probe: a guest flooding TaskOOM made the 2048-entry queue drop 32,975 events in
    0.5 s, TaskExit among them. Now guest-caused events are rate-limited per container and capped in
    the queue; host-caused ones (exits) are all delivered, in order."""
    sink, path = flaky_sink
    pub = EventPublisher(path, "ns1", retry_delay=0.01)
    pub.start()
    for i in range(50):
        for j in range(1000):
            pub.publish(events_pb2.TaskOOM(container_id=f"c{j % 300}"))
        pub.publish(events_pb2.TaskExit(container_id="c", id=f"e{i}", pid=1, exit_status=i))
    assert pub._queue.qsize() <= 50 + 64
    await pub.close(timeout=20)
    exits = [typeurl.unpack(e.event, events_pb2.TaskExit).id for e in sink.envelopes if e.topic == "/tasks/exit"]
    assert exits == [f"e{i}" for i in range(50)]
    ooms = [e for e in sink.envelopes if e.topic == "/tasks/oom"]
    assert 1 <= len(ooms) <= 64
    assert pub.dropped == pub.dropped_guest_events == 50_000 - len(ooms)


def test_the_pool_kind_a_pod_needs_is_read_from_its_network_namespace(tmp_path: Path) -> None:
    from pykata.shim.bootstrap import _netns_of

    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert _netns_of(tmp_path) == "/var/run/netns/cni-1"  # a CRI pod: factory.pool_nics = 1 serves it
    spec["linux"]["namespaces"] = [{"type": "network"}]  # a new, empty one (plain `ctr run`): pool_nics = 0
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert _netns_of(tmp_path) is None
    spec["linux"]["namespaces"] = [{"type": "network", "path": "relative/ns"}]
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert _netns_of(tmp_path) is None
    (tmp_path / "config.json").write_text("[not a spec")
    assert _netns_of(tmp_path) is None


def test_only_a_process_that_runs_the_shim_is_taken_for_one() -> None:
    """`delete` asks whether the bundle's shim.pid is still a shim; a reused pid whose process merely
    names the shim (an editor, grep, a shell comment) is not one (it once matched by substring)."""
    import subprocess
    import sys

    from pykata.shim.bootstrap import _is_shim, is_shim_cmdline

    venv_shim = b"/opt/v/bin/containerd-shim-pykata-v2"
    assert is_shim_cmdline(b"/opt/v/bin/python3.11\0" + venv_shim + b"\0-id\0x\0start\0")
    assert is_shim_cmdline(b"/opt/v/bin/python3.11 " + venv_shim + b" pool-entry" + b"\0" * 40)  # setproctitle
    assert is_shim_cmdline(venv_shim + b"\0delete\0")
    for other in (b"grep\0containerd-shim-pykata-v2\0/var/log/x\0",
                  b"/bin/sh\0-c\0sleep 30 # containerd-shim-pykata-v2\0",
                  b"python3\0-c\0pass\0containerd-shim-pykata-v2\0",
                  b"vim containerd-shim-pykata-v2.log",
                  b"/opt/v/bin/python3.11\0/opt/v/bin/containerd-shim-pykata-v2-old\0",
                  b""):
        assert not is_shim_cmdline(other), other
    namers = [subprocess.Popen(["/bin/sh", "-c", "sleep 30 # containerd-shim-pykata-v2"]),
              subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "containerd-shim-pykata-v2"])]
    runner = subprocess.Popen(["/bin/bash", "-c", f"exec -a {venv_shim.decode()} sleep 30"])
    try:
        for p in namers:
            assert not _is_shim(p.pid)
        deadline = 50
        while not _is_shim(runner.pid) and deadline:  # until bash has exec'd
            deadline -= 1
            subprocess.run(["sleep", "0.1"], check=True)
        assert _is_shim(runner.pid)
    finally:
        for p in (*namers, runner):
            p.kill()
            p.wait()
    assert not _is_shim(runner.pid)


def test_install_containerd_names_a_bad_config_path(tmp_path: Path) -> None:
    """`pykata install containerd --config`: a path in a directory that does not exist (a typo) was
    planned as a new file (and --write made the directories), unreadable or unwritable ones gave
    Python's errno text without the option; each now names --config and the path, no traceback."""
    import subprocess
    import sys

    pykata = [str(Path(sys.executable).parent / "pykata"), "install", "containerd"]
    missing_dir = tmp_path / "no-such-dir" / "config.toml"
    with pytest.raises(InstallError, match=rf"--config {missing_dir}: {missing_dir.parent} does not exist"):
        plan_config(missing_dir)
    not_text = tmp_path / "binary.toml"
    not_text.write_bytes(b"\xff\xfe\x00")
    cases = {missing_dir: "does not exist", tmp_path: "cannot read it: Is a directory",
             not_text: "not a text file", tmp_path / "f" / "config.toml": "cannot read it: Not a directory"}
    (tmp_path / "f").write_text("a file, not a directory")
    for path, why in cases.items():
        p = subprocess.run([*pykata, "--write", "--config", str(path), "--bin-dir", str(tmp_path / "bin")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and p.stderr.startswith(f"pykata: --config {path}: "), p.stderr
        assert why in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not missing_dir.parent.exists() and not (tmp_path / "bin").exists()
    # /proc takes no new files: the plan is a new file there, the write fails
    p = subprocess.run([*pykata, "--write", "--config", "/proc/pykata-test.toml", "--bin-dir", str(tmp_path / "bin")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("pykata: --config /proc/pykata-test.toml: cannot write it: "), \
        p.stderr
