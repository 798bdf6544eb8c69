"""ReseedRandomDev's checks, before it touches the kernel (the VM test, tests/factory/test_clone_entropy.py,
shows two clones of one template diverge)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.agent import entropy as entropy_module
from pykata.agent.entropy import Entropy, reseed_crng
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


def test_a_restored_snapshot_gets_a_new_boot_id_in_the_same_file(tmp_path: Path) -> None:
    """A restored snapshot is a new boot: the second boot id rewrites the file that the guest and every
    container have bound over their boot_id (same inode, so the binds see it), instead of being refused."""
    entropy = Entropy(tmp_path)
    entropy.boot_id_file.write_text(BOOT_ID + "\n")  # as _set_boot_id leaves it (the bind is the kernel's part)
    entropy.boot_id_file.chmod(0o444)
    entropy.boot_id = BOOT_ID
    inode = entropy.boot_id_file.stat().st_ino
    new = "1c9d3b62-9d2f-4f47-8b1f-4b4f3c7e0d21"
    entropy._replace_boot_id(new)
    assert entropy.boot_id_file.read_text() == new + "\n"
    assert entropy.boot_id_file.stat().st_ino == inode and entropy.boot_id == new


def test_reseed_crng_logs_a_refusal_and_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """It runs inside the channel's data callback, so a kernel refusal must not end the session. (The
    real ioctl runs only in a VM: tests/factory/test_template.py shows two raw clones differ.) Fakes: a
    regular file, which refuses the ioctl (ENOTTY), and a missing path."""
    fake = tmp_path / "not-urandom"
    fake.write_bytes(b"")
    monkeypatch.setattr(entropy_module, "URANDOM", str(fake))
    reseed_crng()
    monkeypatch.setattr(entropy_module, "URANDOM", str(tmp_path / "missing"))
    reseed_crng()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("reseeding the kernel RNG: ") and "ioctl" in messages[0].lower()
    assert messages[1].startswith(f"reseeding the kernel RNG: {tmp_path / 'missing'}: ")
    assert fake.read_bytes() == b""


def test_a_boot_id_bound_ahead_is_rewritten_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template's agent binds its boot id file over the kernel's ahead (prepare_boot_id, with the
    kernel's own id in it); a clone's ReseedRandomDev then only rewrites that file, so the bind (the
    guest's and, from then on, every container's) shows the new id. Fakes: the binds are recorded, not
    made, and the kernel's RNG is not fed (both would change this host)."""
    kernel_boot_id = tmp_path / "kernel_boot_id"
    kernel_boot_id.write_text(BOOT_ID + "\n")
    binds: list[tuple[Path, Path]] = []
    monkeypatch.setattr(entropy_module, "bind_readonly", lambda source, target: binds.append((source, target)))
    monkeypatch.setattr(entropy_module, "feed_kernel", lambda data, fd=None: None)
    entropy = Entropy(tmp_path / "state", kernel_boot_id=kernel_boot_id)
    entropy.prepare_boot_id()
    entropy.prepare_boot_id()  # once
    assert binds == [(entropy.boot_id_file, kernel_boot_id)]
    assert entropy.boot_id_file.read_text() == BOOT_ID + "\n" and entropy.boot_id is None
    assert entropy.container_mounts() == []  # containers get it only once the host gave an id
    inode = entropy.boot_id_file.stat().st_ino
    new = "1c9d3b62-9d2f-4f47-8b1f-4b4f3c7e0d21"
    reply = entropy.reseed(agent_pb2.ReseedRandomDevRequest(data=b"x" * 64, boot_id=new), containers_exist=False)
    assert reply.boot_id == new == entropy.boot_id and len(binds) == 1
    assert entropy.boot_id_file.read_text() == new + "\n" and entropy.boot_id_file.stat().st_ino == inode
    assert [m["source"] for m in entropy.container_mounts()] == [str(entropy.boot_id_file)]
    # a restored snapshot's new id, through the descriptor kept since prepare_boot_id
    newer = "2d0e4c73-0e3f-4a58-9c2f-5c5f4d8f1e32"
    entropy._replace_boot_id(newer)
    assert entropy.boot_id_file.read_text() == newer + "\n" and entropy.boot_id_file.stat().st_ino == inode
    entropy.close()
    entropy.close()
