"""pykata.protocols: generated modules, service specs, and proof that they match containerd's sources."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf import descriptor_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor
from google.protobuf.message import Message

import pykata.protocols.gen
from pykata.errors import PykataError
from pykata.protocols import (
    AGENT_SERVICE,
    EVENTS_SERVICE,
    HEALTH_SERVICE,
    TASK_SERVICE,
    MethodSpec,
    ServiceSpec,
    UnknownMethodError,
    agent_pb2,
    cgroups_v1_pb2,
    cgroups_v2_pb2,
    events_pb2,
    mount_pb2,
    shim_pb2,
    task_types_pb2,
    ttrpc_events_pb2,
    typeurl,
)
from pykata.protocols.gen import UPSTREAM

REPO = Path(__file__).resolve().parents[2]
GOCODE = Path("/usr/share/gocode/src")

# containerd 1.6's runtime v2 shim API (runtime/v2/task/shim.proto).
CONTAINERD_16_TASK_METHODS = {
    "Create", "Start", "Delete", "Exec", "State", "Pids", "Pause", "Resume", "Kill", "ResizePty",
    "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown", "Checkpoint",
}
AGENT_METHODS = {
    "CreateContainer", "StartContainer", "RemoveContainer", "ExecProcess", "SignalProcess",
    "WaitProcess", "ReadStdout", "ReadStderr", "WriteStdin", "CloseStdin", "TtyWinResize",
    "StatsContainer", "UpdateContainer", "PauseContainer", "ResumeContainer", "GetOOMEvent",
    "GetGuestDetails", "OnlineCPUMem", "SetGuestDateTime", "CopyFile", "UpdateInterface",
    "UpdateRoutes", "ListInterfaces", "ListRoutes", "CreateSandbox", "DestroySandbox",
    "ReseedRandomDev", "SetPolicy", "GetGuestMetrics", "StartDebugConsole", "WarmUp", "WriteFileFromDisk",
    "ReadFileToDisk", "SyncVolume",
}


def _all_generated_modules() -> list[str]:
    prefix = pykata.protocols.gen.__name__ + "."
    return sorted(m.name for m in pkgutil.walk_packages(pykata.protocols.gen.__path__, prefix))


@pytest.mark.parametrize("name", _all_generated_modules())
def test_generated_module_imports(name: str) -> None:
    module = importlib.import_module(name)
    if name.endswith("_pb2"):
        assert isinstance(module.DESCRIPTOR, FileDescriptor)
        # Classes claim the module they really live in (pickle, reprs, error messages).
        for msg in module.DESCRIPTOR.message_types_by_name:
            assert getattr(module, msg).__module__ == name


def test_generated_modules_cover_every_upstream_file() -> None:
    names = {importlib.import_module(m).DESCRIPTOR.name for m in _all_generated_modules() if m.endswith("_pb2")}
    assert set(UPSTREAM) <= names
    assert "agent/agent.proto" in names
    assert len(UPSTREAM) >= 12


def test_task_service_is_containerd_16_shim_api() -> None:
    assert TASK_SERVICE.name == "containerd.task.v2.Task"
    assert set(TASK_SERVICE.methods) == CONTAINERD_16_TASK_METHODS
    create = TASK_SERVICE.method("Create")
    assert create == MethodSpec("Create", shim_pb2.CreateTaskRequest, shim_pb2.CreateTaskResponse)
    assert TASK_SERVICE.method("Kill").response_type.DESCRIPTOR.full_name == "google.protobuf.Empty"
    assert TASK_SERVICE.method("Connect").response_type is shim_pb2.ConnectResponse
    assert not any(m.client_streaming or m.server_streaming for m in TASK_SERVICE.methods.values())
    assert TASK_SERVICE.path("Wait") == "/containerd.task.v2.Task/Wait"


def test_events_service_forward() -> None:
    assert EVENTS_SERVICE.name == "containerd.services.events.ttrpc.v1.Events"
    assert EVENTS_SERVICE.method("Forward").request_type is ttrpc_events_pb2.ForwardRequest


def test_agent_services() -> None:
    assert AGENT_SERVICE.name == "pykata.agent.v1.AgentService"
    assert set(AGENT_SERVICE.methods) == AGENT_METHODS
    assert HEALTH_SERVICE.name == "pykata.agent.v1.Health"
    assert set(HEALTH_SERVICE.methods) == {"Check", "Version"}
    read = AGENT_SERVICE.method("ReadStdout")
    assert (read.request_type, read.response_type) == (agent_pb2.ReadStreamRequest, agent_pb2.ReadStreamResponse)


def test_service_spec_is_read_only_and_names_bad_methods() -> None:
    with pytest.raises(TypeError):
        TASK_SERVICE.methods["Evil"] = TASK_SERVICE.method("Kill")  # type: ignore[index]
    with pytest.raises(UnknownMethodError, match=r"containerd.task.v2.Task: no method 'Nope'") as info:
        TASK_SERVICE.method("Nope")
    assert isinstance(info.value, PykataError)
    assert info.value.method == "Nope"
    # Usable as a dict key (a ttrpc server keeps its services in one).
    assert {TASK_SERVICE: 1}[TASK_SERVICE] == 1


def test_spec_from_descriptor_one_line_per_service() -> None:
    spec = pykata.protocols.spec_from_descriptor(agent_pb2.DESCRIPTOR.services_by_name["Health"])
    assert isinstance(spec, ServiceSpec)
    assert spec == HEALTH_SERVICE


M = TypeVar("M", bound=Message)


def _roundtrip(msg: M) -> M:
    data = msg.SerializeToString()
    back = type(msg).FromString(data)
    assert back == msg
    return back


def test_roundtrip_task_messages() -> None:
    req = shim_pb2.CreateTaskRequest(
        id="c1",
        bundle="/run/containerd/io.containerd.runtime.v2.task/default/c1",
        rootfs=[mount_pb2.Mount(type="overlay", source="overlay", options=["lowerdir=/a", "upperdir=/b"])],
        terminal=False,
        stdout="/run/fifo/c1-stdout",
    )
    req.options.CopyFrom(typeurl.pack(shim_pb2.ConnectRequest(id="x")))
    back = _roundtrip(req)
    assert back.rootfs[0].options[1] == "upperdir=/b"
    assert typeurl.unpack(back.options, shim_pb2.ConnectRequest).id == "x"

    state = shim_pb2.StateResponse(id="c1", pid=42, status=task_types_pb2.STOPPED, exit_status=137)
    state.exited_at.FromSeconds(1_700_000_000)
    assert _roundtrip(state).status == task_types_pb2.Status.Value("STOPPED") == 3


def test_roundtrip_agent_and_metrics_messages() -> None:
    create = agent_pb2.CreateContainerRequest(
        container_id="c1",
        oci_spec_json='{"ociVersion": "1.0.2"}',
        storages=[agent_pb2.Storage(driver="virtio-fs", source="pykata", fstype="virtiofs",
                                    mount_point="/run/pykata/shared")],
    )
    _roundtrip(create)
    proc = agent_pb2.Process(args=["sh", "-c", "id"], user=agent_pb2.User(uid=1000, gid=1000,
                                                                        additional_gids=[10, 20]))
    assert not proc.HasField("oom_score_adj")
    proc.oom_score_adj = 0
    assert _roundtrip(agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e1", process=proc)
                      ).process.HasField("oom_score_adj")
    eof = _roundtrip(agent_pb2.ReadStreamResponse(eof=True))
    assert eof.data == b"" and eof.eof

    v1 = cgroups_v1_pb2.Metrics(memory=cgroups_v1_pb2.MemoryStat(usage=cgroups_v1_pb2.MemoryEntry(usage=4096)))
    assert _roundtrip(v1).memory.usage.usage == 4096
    v2 = cgroups_v2_pb2.Metrics(pids=cgroups_v2_pb2.PidsStat(current=3, limit=100))
    assert _roundtrip(v2).pids.current == 3


def test_typeurl_matches_containerd_conventions() -> None:
    exit_event = events_pb2.TaskExit(container_id="c1", id="c1", pid=7, exit_status=1,
                                     exited_at=timestamp_pb2.Timestamp(seconds=5))
    packed = typeurl.pack(exit_event)
    # containerd 1.6 (typeurl v1) uses the bare proto name, not "type.googleapis.com/...".
    assert packed.type_url == "containerd.events.TaskExit"
    assert typeurl.unpack(packed, events_pb2.TaskExit) == exit_event
    with pytest.raises(typeurl.TypeURLError, match=r"expected containerd\.events\.TaskOOM"):
        typeurl.unpack(packed, events_pb2.TaskOOM)
    bad = typeurl.pack(exit_event)
    bad.value = b"\xff\xff\xff"
    with pytest.raises(typeurl.TypeURLError, match="undecodable"):
        typeurl.unpack(bad, events_pb2.TaskExit)

    process = typeurl.pack_json(typeurl.OCI_PROCESS_URL, {"args": ["true"], "cwd": "/"})
    assert typeurl.unpack_json(process, typeurl.OCI_PROCESS_URL) == {"args": ["true"], "cwd": "/"}
    with pytest.raises(typeurl.TypeURLError, match="exceeds the limit"):
        typeurl.unpack_json(process, typeurl.OCI_PROCESS_URL, max_bytes=4)
    process.value = b"{not json"
    with pytest.raises(typeurl.TypeURLError, match="invalid JSON"):
        typeurl.unpack_json(process, typeurl.OCI_PROCESS_URL)


# --- golden checks -----------------------------------------------------------------------------


def _upstream_descriptors(tmp_path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Compile containerd's unmodified .proto files (gogoproto options and all) with Debian's protoc."""
    protoc = shutil.which("protoc")
    assert protoc is not None, "protoc missing: scripts/install.sh installs protobuf-compiler"
    found = {}
    # One run per file: upstream imports gogo.proto under two different paths, which one protoc run
    # would see as two files defining the same extensions.
    for i, path in enumerate(UPSTREAM.values()):
        out = tmp_path / f"upstream{i}.pb"
        subprocess.run(
            [protoc, f"-I{GOCODE}", f"-I{GOCODE}/github.com/gogo/protobuf", "-I/usr/include",
             f"--descriptor_set_out={out}", path],
            check=True, capture_output=True,
        )
        (fdp,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
        found[fdp.name] = fdp
    return found


def _wire_shape(fdp: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """What reaches the wire: package, messages, fields, enums, services; no options or file paths."""
    shape = descriptor_pb2.FileDescriptorProto(package=fdp.package, syntax=fdp.syntax)
    shape.message_type.extend(fdp.message_type)
    shape.enum_type.extend(fdp.enum_type)
    shape.service.extend(fdp.service)

    def clear(msg: descriptor_pb2.DescriptorProto) -> None:
        msg.ClearField("options")
        for f in msg.field:
            f.ClearField("options")
            f.ClearField("json_name")
        for e in msg.enum_type:
            e.ClearField("options")
            for v in e.value:
                v.ClearField("options")
        for n in msg.nested_type:
            clear(n)

    for m in shape.message_type:
        clear(m)
    for e in shape.enum_type:
        e.ClearField("options")
        for v in e.value:
            v.ClearField("options")
    for s in shape.service:
        s.ClearField("options")
        for method in s.method:
            method.ClearField("options")
    return shape


def test_golden_containerd_messages_match_upstream_sources(tmp_path: Path) -> None:
    upstream = _upstream_descriptors(tmp_path)
    ours = {}
    for module in _all_generated_modules():
        if module.endswith("_pb2"):
            fd = importlib.import_module(module).DESCRIPTOR
            ours[fd.name] = fd
    checked_fields = 0
    for local, upstream_path in UPSTREAM.items():
        mine = descriptor_pb2.FileDescriptorProto()
        ours[local].CopyToProto(mine)
        theirs = upstream[upstream_path]
        assert mine.package == theirs.package
        # Every message, field (name, number, type, label, type name), enum value and RPC is equal.
        assert _wire_shape(mine) == _wire_shape(theirs), f"{local} differs from {upstream_path}"
        checked_fields += sum(len(m.field) for m in theirs.message_type)
    assert checked_fields > 150


def test_golden_spot_checks_against_shim_proto() -> None:
    text = (GOCODE / UPSTREAM["containerd/runtime/v2/task/shim.proto"]).read_text()
    assert "package containerd.task.v2;" in text and "service Task {" in text
    fields = shim_pb2.CreateTaskRequest.DESCRIPTOR.fields_by_name
    assert {n: fields[n].number for n in ("id", "bundle", "rootfs", "options")} == {
        "id": 1, "bundle": 2, "rootfs": 3, "options": 10}
    assert shim_pb2.ConnectResponse.DESCRIPTOR.fields_by_name["shim_pid"].number == 1
    assert events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert cgroups_v1_pb2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert cgroups_v2_pb2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"


def _type_name(f: FieldDescriptor) -> str:
    if f.message_type is not None:
        return str(f.message_type.full_name)
    if f.enum_type is not None:
        return str(f.enum_type.full_name)
    names = {v: k for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    return names[f.type][len("TYPE_"):].lower()


def describe_agent_contract() -> set[str]:
    """One line per field, enum value and RPC of agent.proto, as in protos/agent/agent.fields.golden."""
    lines: set[str] = set()

    def walk(m: object) -> None:
        for f in m.fields:  # type: ignore[attr-defined]
            rep = "repeated " if f.is_repeated else ""
            lines.add(f"{m.full_name}.{f.name} = {f.number} {rep}{_type_name(f)}")  # type: ignore[attr-defined]
        for n in m.nested_types:  # type: ignore[attr-defined]
            walk(n)

    fd = agent_pb2.DESCRIPTOR
    for m in fd.message_types_by_name.values():
        walk(m)
    for e in fd.enum_types_by_name.values():
        lines.update(f"{e.full_name}.{v.name} = {v.number} enum" for v in e.values)
    for s in fd.services_by_name.values():
        lines.update(f"{s.full_name}/{m.name} {m.input_type.full_name} -> {m.output_type.full_name}"
                     for m in s.methods)
    return lines


def test_agent_wire_contract_unchanged() -> None:
    golden = REPO / "protos/agent/agent.fields.golden"
    released = {ln for ln in golden.read_text().splitlines() if ln and not ln.startswith("#")}
    current = describe_agent_contract()
    assert not released - current, "agent.proto broke its wire contract (renumbered/retyped/removed)"
    # New fields must be recorded, so that they are protected from then on.
    assert not current - released, f"append to {golden.name}: {sorted(current - released)}"


def test_generated_agent_module_is_in_sync_with_agent_proto(tmp_path: Path) -> None:
    """Someone edited agent.proto but did not rerun scripts/gen_protos.py (or the reverse)."""
    protoc = shutil.which("protoc")
    assert protoc is not None, "protoc missing: scripts/install.sh installs protobuf-compiler"
    out = tmp_path / "agent.pb"
    subprocess.run([protoc, f"-I{REPO / 'protos'}", "-I/usr/include", f"--descriptor_set_out={out}",
                    "agent/agent.proto"], check=True, capture_output=True)
    (source,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    generated = descriptor_pb2.FileDescriptorProto()
    agent_pb2.DESCRIPTOR.CopyToProto(generated)
    assert _wire_shape(generated) == _wire_shape(source), "run scripts/gen_protos.py"
