"""ReseedRandomDev's checks, before it touches the kernel (the VM test, tests/factory/test_clone_entropy.py,
shows two clones of one template diverge)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.agent.entropy import Entropy
from pykata.errors import FailedPrecondition, InvalidArgument
from pykata.protocols.agent import agent_pb2

BOOT_ID = "0b8c2a51-8c1e-4e36-9a0e-3a3f2b6d9c10"


@pytest.mark.parametrize(("req", "field"), [
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 31), "data"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 513), "data"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id="not-a-uuid"), "boot_id"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id=BOOT_ID.upper()), "boot_id"),
    (agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id="../" * 20), "boot_id"),
])
def test_bad_requests_name_the_field(tmp_path: Path, req: agent_pb2.ReseedRandomDevRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Entropy(tmp_path).reseed(req, containers_exist=False)
    assert info.value.field == field and str(info.value).startswith(field + ":")
    assert not (tmp_path / "boot_id").exists()


def test_boot_id_cannot_change_under_running_containers(tmp_path: Path) -> None:
    entropy = Entropy(tmp_path)
    with pytest.raises(FailedPrecondition):
        entropy.reseed(agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id=BOOT_ID), containers_exist=True)
    assert entropy.container_mounts() == []
