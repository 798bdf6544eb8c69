"""One id rule end to end: what the shim accepts, the sandbox, the VM driver and the agent accept too,
and the longest accepted id still fits the unix sockets of its sandbox."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata import ids
from pykata.agent import validation
from pykata.agentapi import replies
from pykata.config import Config
from pykata.config.schema import QemuConfig
from pykata.errors import HypervisorError, InvalidArgument
from pykata.hypervisor.qemu.driver import QemuHypervisor
from pykata.hypervisor.qemu.launch import LaunchSpec, VmPaths, build_command_line
from pykata.protocols import shim_pb2
from pykata.protocols.agent import agent_pb2
from pykata.sandbox.sandbox import AGENT_PROXY_SOCKET, sandboxes_dir
from pykata.shim.events import EventPublisher
from pykata.shim.service import TaskService

GOOD = ["a", "A1", "abc-1.x_y", "a" * ids.MAX_ID_LENGTH, "0" * 64]
BAD = ["", "a/b", "-a", "a-", ".a", "a..b", "a__b", "sp ace", "nul\x00", "é", "../etc",
       "a" * (ids.MAX_ID_LENGTH + 1), "a" * 76, "a" * 77]


@pytest.mark.parametrize("value", GOOD)
def test_good_ids_pass_every_layer(value: str) -> None:
    assert ids.check_container_id(value) == ids.check_sandbox_id(value) == ids.check_exec_id(value) == value
    assert validation.check_id("container_id", value) == value  # the agent
    assert replies.get_oom_event(agent_pb2.OOMEvent(container_id=value)) == value  # an agent's answer
    QemuHypervisor(value, Config())  # the driver names the VM by it


@pytest.mark.parametrize("value", BAD)
def test_bad_ids_fail_every_layer_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ids.check_container_id(value, "id")
    assert info.value.field == "id" and str(info.value).startswith("id: ")
    with pytest.raises(InvalidArgument):
        validation.check_id("container_id", value)
    if value:  # "" is "no event"
        with pytest.raises(replies.BadReply):
            replies.get_oom_event(agent_pb2.OOMEvent(container_id=value))
    with pytest.raises(HypervisorError, match="bad VM id"):
        QemuHypervisor(value, Config())


def test_the_init_process_has_an_empty_exec_id() -> None:
    assert ids.check_exec_id("", allow_empty=True) == ""
    with pytest.raises(InvalidArgument, match="exec_id"):
        ids.check_exec_id("")


async def test_the_shim_refuses_a_65_character_id_before_any_work(tmp_path: Path) -> None:
    """containerd allows 76 characters; 65-76 used to pass the shim and fail in the driver."""
    svc = TaskService("sb", "ns", EventPublisher(None, "ns"))
    for n in (65, 76):
        with pytest.raises(InvalidArgument) as info:
            await svc.Create(shim_pb2.CreateTaskRequest(id="c" * n, bundle=str(tmp_path)), None)
        assert info.value.field == "id"
    with pytest.raises(InvalidArgument) as info:
        await svc.Exec(shim_pb2.ExecProcessRequest(id="c", exec_id="e" * 65), None)
    assert svc.sandbox is None and not svc.containers
    await svc.close()


def test_the_longest_id_fits_its_unix_sockets() -> None:
    config = Config()
    sandbox = sandboxes_dir(config) / ("a" * ids.MAX_ID_LENGTH)
    vm = VmPaths(sandbox / "vm")
    for sock in (vm.qmp_socket, vm.agent_socket, vm.virtiofsd_socket, sandbox / AGENT_PROXY_SOCKET):
        assert len(os.fsencode(sock)) <= 107, sock  # sun_path holds 108 bytes with the NUL


def test_a_vm_is_told_by_its_exact_name_not_by_a_substring() -> None:
    """A recorded VMM pid is this sandbox's QEMU only if its `-name` is exactly this id's: "abc" is a
    prefix of "abc1", and a user's process may name the sandbox's files."""
    spec = LaunchSpec(vm_id="abc", config=QemuConfig(), accel="tcg", kernel=Path("/k"),
                      paths=VmPaths(Path("/run/pykata/sandboxes/abc/vm")))
    argv = build_command_line(spec).argv()
    assert ids.names_vm(argv, "abc")
    assert ids.names_vm(["/usr/bin/unshare", "--fork", "--", *argv], "abc")  # its lifeline wrapper
    assert not ids.names_vm(argv, "ab")
    assert not ids.names_vm([a.replace("pykata-abc", "pykata-abc1") for a in argv], "abc")
    assert not ids.names_vm(["tail", "/run/pykata/sandboxes/abc/vm/qemu.log", "pykata-abc"], "abc")
