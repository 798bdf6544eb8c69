"""Who `pykata exec` runs a command as without -u: the container's recorded user, read as the SDK reads a
saved one (ExecUser.from_list: ids in runc's range, a bounded number of groups); the CLI parsed the list
by hand, so a record of [0] ran as root and [4294967295, 0] ((uid_t)-1, a no-op for setresuid) went to the
agent. A record that does not say runs as root with the groups the image gives root, as container_user
decides for the SDK and for run. Unit tests on state records (tests/cli/test_run.py runs exec in a real
VM, with -u and without)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pykata.cli.run import _container_user, _exec_user
from pykata.config import load_config
from pykata.images import ImageStore
from pykata.sandbox import SpecError
from pykata.sandbox.imageuser import MAX_GROUPS, ExecUser, container_user, resolve_user
from pykata.sandbox.lookup import Found
from pykata.sandbox.state import ContainerRecord, SandboxRecord

CID = "c0ffee" * 4


def _found(tmp_path: Path, user: list[int], image: str = "") -> Found:
    record = SandboxRecord(
        id=CID,
        owner_pid=1,
        created_at=time.time(),
        status="running",
        containers={CID: ContainerRecord(id=CID, image=image, user=user)},
    )
    return Found(tmp_path, record)


@pytest.mark.parametrize(
    "ids",
    [
        [4242, 50, 50],
        [0, 0, 0, 10],
        [65534, 65534],
        [2147483647, 2147483647, 2147483647],
        [0],  # ran as root
        [4294967295, 0],  # (uid_t)-1 went to the agent
        [1000, 2147483648],
        [1000, 1000, *range(MAX_GROUPS + 1)],
        [-1, 0],
    ],
)
def test_the_recorded_user_is_read_as_the_sdk_reads_one(tmp_path: Path, ids: list[int]) -> None:
    want = ExecUser.from_list(ids)
    if want is not None:
        assert _container_user(_found(tmp_path, ids)) == want
        return
    with pytest.raises(SpecError) as err:
        _container_user(_found(tmp_path, ids))
    assert err.value.field == f"containers.{CID}.user" and "state.json" in str(err.value), err.value
    assert "give -u" in str(err.value)


def test_a_record_without_a_user_runs_as_the_images_root(tmp_path: Path) -> None:
    """root with its groups from the image's /etc/group (busybox's), what container_user gives a container
    without -u and without a USER; numbers only (root, group 0) for an image pykata does not know."""
    config = load_config()
    rootfs = ImageStore(Path(config.runtime.cache_dir), config.image).resolve("busybox").rootfs
    root = container_user(rootfs, None, "")
    assert root == resolve_user(rootfs, "0") and root[:2] == (0, 0) and root.groups[0] == 0
    assert _container_user(_found(tmp_path, [], "busybox")) == root
    assert _container_user(_found(tmp_path, [], "")) == ExecUser(0, 0, (0,))
    assert _container_user(_found(tmp_path, [], "/no/such/image")) == ExecUser(0, 0, (0,))
    # -u looks up in the same image
    assert _exec_user(_found(tmp_path, [4242, 50, 50], "busybox"), "nobody") == resolve_user(rootfs, "nobody")
    with pytest.raises(SpecError, match=r"^--user: .*give numbers"):
        _exec_user(_found(tmp_path, [], ""), "nobody")
