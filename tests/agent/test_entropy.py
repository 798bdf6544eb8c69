"""ReseedRandomDev's checks, before it touches the kernel (the VM test, tests/factory/test_clone_entropy.py,
shows two clones of one template diverge)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.agent.entropy import Entropy
from pykata.protocols.agent import agent_pb2
from pykata.ttrpc import Code, RpcError

BOOT_ID = "0b8c2a51-8c1e-4e36-9a0e-3a3f2b6d9c10"


@pytest.mark.parametrize(("req", "field"), [
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 31), "data"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 513), "data"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id="not-a-uuid"), "boot_id"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id=BOOT_ID.upper()), "boot_id"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id="../" * 20), "boot_id"),
])
def test_bad_requests_name_the_field(tmp_path: Path, req: agent_pb2.ReseedRandomDevRequest, field: str) -> None:
    with pytest.raises(RpcError) as info:
        Entropy(tmp_path).reseed(req, containers_exist=False)
    assert info.value.code == Code.INVALID_ARGUMENT and info.value.message.startswith(field + ":")
    assert not (tmp_path / "boot_id").exists()


def test_boot_id_cannot_change_under_running_containers(tmp_path: Path) -> None:
    entropy = Entropy(tmp_path)
    with pytest.raises(RpcError) as info:
        entropy.reseed(agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id=BOOT_ID), containers_exist=True)
    assert info.value.code == Code.FAILED_PRECONDITION
    assert entropy.container_mounts() == []
