"""Bad requests get INVALID_ARGUMENT (naming the field), NOT_FOUND or ALREADY_EXISTS, and change nothing."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pykata.agent import bundle
from pykata.errors import InvalidArgument
from pykata.protocols.agent import agent_pb2
from pykata.ttrpc import Code, RpcError
from tests.agent.conftest import AgentHelper


async def _expect(code: Code, call: Any, field: str = "") -> RpcError:
    with pytest.raises(RpcError) as ei:
        await call
    assert ei.value.code == code, ei.value
    assert field in ei.value.message, ei.value.message
    return ei.value


@pytest.mark.parametrize("bad_id", ["", "../etc", "a/b", "-dash", ".dot", "x" * 129, "sp ace", "nul\x00", "é"])
async def test_invalid_container_ids_are_rejected(agent: AgentHelper, bad_id: str) -> None:
    spec = json.dumps(agent.spec(["true"]))
    await _expect(Code.INVALID_ARGUMENT, agent.stub.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id=bad_id, oci_spec_json=spec)), "container_id")
    await _expect(Code.INVALID_ARGUMENT, agent.stub.StartContainer(
        agent_pb2.StartContainerRequest(container_id=bad_id)), "container_id")
    await _expect(Code.INVALID_ARGUMENT, agent.stub.ReadStdout(
        agent_pb2.ReadStreamRequest(container_id=bad_id)), "container_id")
    assert not os.listdir(agent.env.state_dir / "crun")


async def test_unknown_container_is_not_found_and_duplicate_already_exists(agent: AgentHelper) -> None:
    await _expect(Code.NOT_FOUND, agent.stub.StartContainer(agent_pb2.StartContainerRequest(container_id="nope")))
    await _expect(Code.NOT_FOUND, agent.stub.WaitProcess(agent_pb2.WaitProcessRequest(container_id="nope")))
    await agent.create("dup", args=["true"])
    await _expect(Code.ALREADY_EXISTS, agent.stub.CreateContainer(agent_pb2.CreateContainerRequest(
        container_id="dup", oci_spec_json=json.dumps(agent.spec(["true"])))))
    await _expect(Code.NOT_FOUND, agent.stub.ReadStdout(
        agent_pb2.ReadStreamRequest(container_id="dup", exec_id="missing")))
    await _expect(Code.INVALID_ARGUMENT, agent.stub.ReadStdout(
        agent_pb2.ReadStreamRequest(container_id="dup", exec_id="../x")), "exec_id")
    await _expect(Code.INVALID_ARGUMENT, agent.stub.SignalProcess(
        agent_pb2.SignalProcessRequest(container_id="dup", signal=999)), "signal")
    await _expect(Code.INVALID_ARGUMENT, agent.stub.ExecProcess(agent_pb2.ExecProcessRequest(
        container_id="dup", exec_id="", process=agent_pb2.Process(args=["true"]))), "exec_id")


def _bad_specs(agent: AgentHelper, outside: Path) -> list[tuple[str, Any]]:
    def spec(**changes: Any) -> dict[str, Any]:
        s = agent.spec(["true"])
        for path, value in changes.items():
            target = s
            keys = path.split("__")
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
        return s

    bind = {"destination": "/host", "type": "bind", "source": "/etc", "options": ["rbind", "ro"]}
    escape = {"destination": "/x", "type": "bind", "source": f"{agent.env.shared_dir}/../state",
              "options": ["rbind"]}
    return [
        ("root.path", spec(root={"path": "/"})),
        ("root.path", spec(root={"path": str(outside)})),
        ("root.path", spec(root={"path": f"{agent.env.shared_dir}/busybox/../../state"})),
        ("root.path", spec(root={"path": "relative/rootfs"})),
        ("mounts[", {**agent.spec(["true"]), "mounts": [bind]}),
        ("mounts[", {**agent.spec(["true"]), "mounts": [escape]}),
        ("mounts[0].type", {**agent.spec(["true"]), "mounts": [{"destination": "/d", "type": "ext4",
                                                                "source": "/dev/sda"}]}),
        ("process.args", spec(process__args=[])),
        ("process.env[2]", spec(process__env=["PATH=/bin", "HOME=/", "NOEQUALS"])),
        ("process.env[0]", spec(process__env=["=value"])),
        ("process.cwd", spec(process__cwd="tmp")),
        ("process.user.uid", spec(process__user={"uid": -1, "gid": 0})),
        # (uid_t)-1: setresuid(-1, -1, -1) is a no-op, the process would stay root; refused as runc does
        ("process.user.uid", spec(process__user={"uid": 4294967295, "gid": 0})),
        ("process.user.gid", spec(process__user={"uid": 0, "gid": 4294967295})),
        ("process.user.additionalGids[1]", spec(process__user={"uid": 0, "gid": 0, "additionalGids": [0, 2**32 - 1]})),
        ("process.user.uid", spec(process__user={"uid": 2**31, "gid": 0})),
        ("oci_spec_json", "x" * ((1 << 20) + 1)),
        ("oci_spec_json", "[]"),
        ("oci_spec_json", "{not json"),
        ("oci_spec_json", "[" * 100_000),
    ]


async def test_bad_specs_name_the_field_and_leave_nothing(agent: AgentHelper, tmp_path: Path) -> None:
    outside = tmp_path / "rootfs"
    outside.mkdir()
    (agent.env.shared_dir / "link").symlink_to(outside)
    try:
        cases = _bad_specs(agent, outside)
        cases.append(("root.path", agent.spec(["true"]) | {"root": {"path": str(agent.env.shared_dir / "link")}}))
        for i, (field, spec) in enumerate(cases):
            text = spec if isinstance(spec, str) else json.dumps(spec)
            await _expect(Code.INVALID_ARGUMENT, agent.stub.CreateContainer(agent_pb2.CreateContainerRequest(
                container_id=f"bad{i}", oci_spec_json=text)), field)
    finally:
        (agent.env.shared_dir / "link").unlink()
    assert not os.listdir(agent.env.state_dir / "crun")
    assert not os.listdir(agent.env.state_dir / "bundles")


async def test_bad_storage_mount_points_are_rejected(agent: AgentHelper) -> None:
    cases = [
        agent_pb2.Storage(driver="tmpfs", source="tmpfs", mount_point="/mnt/evil"),
        agent_pb2.Storage(driver="tmpfs", source="tmpfs", mount_point=f"{agent.env.state_dir}/storage/../crun"),
        agent_pb2.Storage(driver="bind", source="/etc", mount_point=f"{agent.env.state_dir}/storage/etc"),
        agent_pb2.Storage(driver="nfs", source="x", mount_point=f"{agent.env.state_dir}/storage/n"),
    ]
    for i, storage in enumerate(cases):
        await _expect(Code.INVALID_ARGUMENT, agent.stub.CreateContainer(agent_pb2.CreateContainerRequest(
            container_id=f"st{i}", oci_spec_json=json.dumps(agent.spec(["true"])), storages=[storage])),
            "storages[0]")
    assert not Path("/mnt/evil").exists()


async def test_copy_file_writes_inside_the_shared_dir_only(agent: AgentHelper, tmp_path: Path) -> None:
    shared = agent.env.shared_dir
    target = f"{shared}/copied/sub/file.txt"
    payload = os.urandom(3 * (1 << 20) + 17)
    chunk = 1 << 20
    for off in range(0, len(payload), chunk):
        await agent.stub.CopyFile(agent_pb2.CopyFileRequest(
            path=target, file_size=len(payload), file_mode=0o640, dir_mode=0o750, offset=off,
            data=payload[off:off + chunk]))
    written = Path(target)
    assert written.read_bytes() == payload
    assert written.stat().st_mode & 0o777 == 0o640
    assert (shared / "copied/sub").stat().st_mode & 0o777 == 0o750
    assert not list(written.parent.glob(".*pykata-part"))

    outside = tmp_path / "outside"
    outside.mkdir()
    (shared / "escape").symlink_to(outside)
    try:
        bad = [
            ("path", "/etc/pykata-should-not-exist"),
            ("path", f"{shared}/../state/crun/x"),
            ("path", "relative/file"),
            ("path", f"{shared}/escape/file"),
            ("path", str(shared)),
        ]
        for field, path in bad:
            await _expect(Code.INVALID_ARGUMENT, agent.stub.CopyFile(agent_pb2.CopyFileRequest(
                path=path, file_size=1, data=b"x")), field)
        (shared / "copied/evil").symlink_to(outside / "victim")
        await _expect(Code.INVALID_ARGUMENT, agent.stub.CopyFile(agent_pb2.CopyFileRequest(
            path=f"{shared}/copied/evil", file_size=1, data=b"x")), "path")
        # size bounds
        await _expect(Code.INVALID_ARGUMENT, agent.stub.CopyFile(agent_pb2.CopyFileRequest(
            path=f"{shared}/big", file_size=1 << 40, data=b"")), "file_size")
        await _expect(Code.INVALID_ARGUMENT, agent.stub.CopyFile(agent_pb2.CopyFileRequest(
            path=f"{shared}/big", file_size=2 << 20, data=b"x" * ((1 << 20) + 1))), "data")
        await _expect(Code.INVALID_ARGUMENT, agent.stub.CopyFile(agent_pb2.CopyFileRequest(
            path=f"{shared}/big", file_size=4, offset=2, data=b"xyz")), "offset")
        await _expect(Code.INVALID_ARGUMENT, agent.stub.CopyFile(agent_pb2.CopyFileRequest(
            path=f"{shared}/mode", file_size=1, file_mode=0o4755, data=b"x")), "file_mode")
        assert not os.listdir(outside)
        assert not Path("/etc/pykata-should-not-exist").exists()
    finally:
        (shared / "escape").unlink()
        import shutil

        shutil.rmtree(shared / "copied")


async def test_io_sizes_are_bounded(agent: AgentHelper) -> None:
    await agent.create("sizes", args=["cat"])
    await agent.start("sizes")
    await _expect(Code.INVALID_ARGUMENT, agent.stub.WriteStdin(agent_pb2.WriteStreamRequest(
        container_id="sizes", data=b"x" * ((1 << 20) + 1))), "data")
    # cat blocks once its stdout is not read: write and read at the same time
    writing = asyncio.ensure_future(agent.write_stdin("sizes", b"y" * (3 << 20)))
    # max_length above the agent's cap is capped, not refused
    resp = await agent.stub.ReadStdout(agent_pb2.ReadStreamRequest(container_id="sizes", max_length=64 << 20))
    assert 0 < len(resp.data) <= 1 << 20
    rest = await agent.read_all("sizes")
    await writing
    assert len(resp.data) + len(rest) == 3 << 20
    await _expect(Code.INVALID_ARGUMENT, agent.stub.TtyWinResize(agent_pb2.TtyWinResizeRequest(
        container_id="sizes", rows=70000, columns=1)), "rows")


async def test_copy_file_makes_directories_and_symlinks(agent: AgentHelper, tmp_path: Path) -> None:
    """Kata's CopyFile file types: S_IFDIR makes a directory, S_IFLNK a symlink to `data` (a host copies
    an image's tree into a guest that shares no file system); neither follows a symlink on the way."""
    import stat

    shared = agent.env.shared_dir
    await agent.stub.CopyFile(agent_pb2.CopyFileRequest(path=f"{shared}/tree/bin", file_mode=stat.S_IFDIR | 0o750,
                                                        uid=1000, gid=1000))
    made = shared / "tree/bin"
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o750 and made.stat().st_uid == 1000
    for _ in range(2):  # replacing a symlink is fine
        await agent.stub.CopyFile(agent_pb2.CopyFileRequest(path=f"{shared}/tree/bin/sh", data=b"/bin/busybox",
                                                            file_size=12, file_mode=stat.S_IFLNK | 0o777))
    assert os.readlink(shared / "tree/bin/sh") == "/bin/busybox"
    outside = tmp_path / "outside"
    outside.mkdir()
    (shared / "tree/escape").symlink_to(outside)
    try:
        for path, data, mode, field in [
            (f"{shared}/tree/escape/x", b"/t", stat.S_IFLNK | 0o777, "path"),     # through a symlink
            (f"{shared}/tree/escape/d", b"", stat.S_IFDIR | 0o755, "path"),
            (f"{shared}/tree/bin", b"/t", stat.S_IFLNK | 0o777, "path"),          # over a directory
            (f"{shared}/tree/l2", b"", stat.S_IFLNK | 0o777, "data"),             # no target
            (f"{shared}/tree/l3", b"a\0b", stat.S_IFLNK | 0o777, "data"),
            (f"{shared}/tree/fifo", b"", stat.S_IFIFO | 0o644, "file_mode"),
            (f"{shared}/tree/d2", b"", stat.S_IFDIR | 0o4755, "file_mode"),
            ("/etc/pykata-dir", b"", stat.S_IFDIR | 0o755, "path"),
        ]:
            await _expect(Code.INVALID_ARGUMENT, agent.stub.CopyFile(agent_pb2.CopyFileRequest(
                path=path, data=data, file_size=len(data), file_mode=mode)), field)
        assert not os.listdir(outside)
        assert not Path("/etc/pykata-dir").exists()
    finally:
        (shared / "tree/escape").unlink()


@pytest.mark.parametrize(("user", "field"), [
    (agent_pb2.User(uid=4294967295, gid=0), "process.user.uid"),
    (agent_pb2.User(uid=1000, gid=4294967295), "process.user.gid"),
    (agent_pb2.User(uid=1000, gid=1000, additional_gids=[1000, 4294967295]), "process.user.additionalGids[1]"),
])
def test_an_exec_as_uid_minus_one_is_refused(tmp_path: Path, user: agent_pb2.User, field: str) -> None:
    """An exec's user (ExecProcess, the data disk's copies) checked as a container's: 4294967295 is
    (uid_t)-1, which setresuid ignores, so the process would stay root in the guest."""
    with pytest.raises(InvalidArgument) as info:
        bundle.process_from_proto(agent_pb2.Process(args=["true"], user=user), {}, tmp_path)
    assert info.value.field == field
