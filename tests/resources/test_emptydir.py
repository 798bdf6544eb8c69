"""The emptyDir rule (pykata.resources.emptydir) on real host directories, the sandbox's decision per
volume, and the agent's checks of a pod volume's mount point (refused before anything is mounted).
The CRI tests (tests/cri/test_emptydir.py) run the same through real pods."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pykata.agent import storage
from pykata.config import Config
from pykata.errors import InvalidArgument
from pykata.protocols.agent import agent_pb2
from pykata.resources import emptydir
from pykata.resources.emptydir import EMPTY_DIR_PLUGIN, SANDBOX_UID_ANNOTATION, EmptyDir
from pykata.sandbox.sandbox import Sandbox

UID = "0f6b2a4e-1c9d-4e1f-9a57-5b2d1f0c3a11"


def _parent(root: Path, uid: str = UID) -> Path:
    return root / "pods" / uid / "volumes" / EMPTY_DIR_PLUGIN


def _name(root: Path, source: str, uid: str = UID) -> str | None:
    return emptydir.volume_name(source, "mounts[3].source", str(root), uid)


def test_only_the_pods_own_emptydir_paths_are_volumes(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    assert _name(tmp_path, f"{parent}/cache") == "cache"
    assert _name(tmp_path, f"{parent}/a-0") == "a-0"
    # merely containing the plugin's name: another pod, another root, another depth -> a host bind
    assert _name(tmp_path, f"{_parent(tmp_path, 'other-pod')}/cache") is None
    assert _name(tmp_path, f"/data/{EMPTY_DIR_PLUGIN}/cache") is None
    assert _name(tmp_path, f"{tmp_path}/pods/{UID}/volumes/{EMPTY_DIR_PLUGIN}-x/cache") is None
    assert _name(tmp_path, f"{tmp_path}/x/pods/{UID}/volumes/{EMPTY_DIR_PLUGIN}/cache") is None


@pytest.mark.parametrize("tail", ["Cache", "a_b", "../../../../etc", "a/../../../x", "a/b", "", ".", "..",
                                  "a/", "-a", "a" * 64, "a\nb", "a b"])
def test_a_crafted_path_under_the_pods_emptydir_directory_is_refused_naming_the_field(
        tmp_path: Path, tail: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _name(tmp_path, f"{_parent(tmp_path)}/{tail}")
    assert info.value.field == "mounts[3].source"


def test_dotdot_into_the_emptydir_directory_is_refused(tmp_path: Path) -> None:
    sneaky = f"{tmp_path}/pods/{UID}/volumes/x/../{EMPTY_DIR_PLUGIN}/cache"
    with pytest.raises(InvalidArgument) as info:
        _name(tmp_path, sneaky)
    assert info.value.field == "mounts[3].source" and "'..'" in str(info.value)


def test_host_directory_inspected_without_following_symlinks(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    parent.mkdir(parents=True)
    (parent / "cache").mkdir(mode=0o777)
    (parent / "cache").chmod(0o2777)
    vol = emptydir.inspect(str(parent / "cache"), "cache", "f")
    assert vol == EmptyDir("cache", memory=False, mode=0o2777, uid=0, gid=0, host_size_mib=0)
    # a directory that already holds files is not taken into the guest (None: shared from the host)
    (parent / "full").mkdir()
    (parent / "full" / "data").write_text("user data")
    assert emptydir.inspect(str(parent / "full"), "full", "f") is None
    # kubelet makes a directory: a symlink (even to a directory), a file or nothing is refused
    (parent / "link").symlink_to(parent / "cache")
    (parent / "file").write_text("")
    for name in ("link", "file", "missing"):
        with pytest.raises(InvalidArgument) as info:
            emptydir.inspect(str(parent / name), name, "mounts[0].source")
        assert info.value.field == "mounts[0].source"


def test_tmpfs_size_is_bounded() -> None:
    disk = EmptyDir("d", memory=False, mode=0o777, uid=0, gid=0, host_size_mib=0)
    assert disk.tmpfs_options(256) == ["mode=777", "uid=0", "gid=0", "size=256m"]
    mem = dataclasses.replace(disk, memory=True, host_size_mib=32)
    assert mem.tmpfs_options(256)[-1] == "size=32m"
    assert dataclasses.replace(mem, host_size_mib=4096).tmpfs_options(256)[-1] == "size=256m"
    assert disk.guest_path == "/run/pykata-agent/emptydir/d"


def _spec(uid: str | None, *sources: str) -> dict[str, Any]:
    return {"process": {"args": ["true"]}, "root": {"path": "rootfs"},
            "annotations": {SANDBOX_UID_ANNOTATION: uid} if uid else {},
            "mounts": [{"destination": f"/m{i}", "type": "bind", "source": s, "options": ["rbind", "rw"]}
                       for i, s in enumerate(sources)]}


def test_sandbox_decides_once_per_volume_and_only_for_its_pod(tmp_path: Path) -> None:
    parent = _parent(tmp_path)
    parent.mkdir(parents=True)
    for name in ("cache", "full"):
        (parent / name).mkdir()
    config = Config()
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, kubelet_root_dir=str(tmp_path)))
    sb = Sandbox("sb", config, tmp_path / "sb")
    sources = (f"{parent}/cache", "/etc", f"{parent}/full")
    (parent / "full" / "kept").write_text("x")
    assert sb._pod_volumes("pause", _spec(UID)) == {}          # the sandbox container names the pod
    found = sb._pod_volumes("c1", _spec(UID, *sources))
    assert list(found) == [0] and found[0].name == "cache"
    assert sb.pod_volumes == {"cache": found[0], "full": None}
    # decided: a file now on the host changes nothing for the pod's next container
    (parent / "cache" / "late").write_text("x")
    assert list(sb._pod_volumes("c2", _spec(UID, *sources))) == [0]
    # a container claiming another pod's uid, or none, gets no guest emptyDir
    assert sb._pod_volumes("c3", _spec("someone-else", *sources)) == {}
    assert sb._pod_volumes("c4", _spec(None, *sources)) == {}
    # the admin's switch back to the host-shared way
    off = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, disable_guest_empty_dir=True))
    sb2 = Sandbox("sb2", off, tmp_path / "sb2")
    assert sb2._pod_volumes("c1", _spec(UID, f"{parent}/cache")) == {}


@pytest.mark.parametrize(("mount_point", "driver", "field"), [
    ("/state/emptydir/../x", "tmpfs", "storages[0].mount_point"),
    ("/state/emptydir/a/b", "tmpfs", "storages[0].mount_point"),
    ("/state/emptydir/Bad_Name", "tmpfs", "storages[0].mount_point"),
    ("/state/emptydir/cache", "bind", "storages[0].driver"),
    ("/etc/cron.d", "tmpfs", "storages[0].mount_point"),
])
def test_agent_refuses_a_pod_volume_outside_its_directory(mount_point: str, driver: str, field: str) -> None:
    """Refused before any directory is made or anything mounted (the paths do not even exist here)."""
    root = Path("/state/emptydir")
    store = storage.Storages([root], [root], pod_volume_root=root)
    with pytest.raises(InvalidArgument) as info:
        store.mount(agent_pb2.Storage(driver=driver, source="tmpfs", fstype="tmpfs", mount_point=mount_point),
                    "storages[0]")
    assert info.value.field == field
    assert store.pod_volumes == {}


def test_guest_tmpfs_bound_follows_the_configuration(tmp_path: Path) -> None:
    """emptydir_size, else the writable layer's rootfs_upper_size (the SDK's disk_mib), else half the VM."""
    vol = EmptyDir("cache", memory=False, mode=0o777, uid=0, gid=0, host_size_mib=0)
    base = Config()
    for emptydir_size, upper, want in ((50, 100, "size=50m"), (0, 100, "size=100m")):
        config = dataclasses.replace(base, runtime=dataclasses.replace(
            base.runtime, emptydir_size=emptydir_size, rootfs_upper_size=upper))
        (st,) = Sandbox("sb", config, tmp_path)._pod_volume_storages([vol, vol])  # one storage per volume
        assert (st.driver, st.mount_point, st.options[-1]) == ("tmpfs", vol.guest_path, want)


def test_a_subpath_keeps_the_volume_on_the_host_or_is_refused(tmp_path: Path) -> None:
    """kubelet binds a subPath from <root>/pods/<uid>/volume-subpaths/<volume>/...: such a volume is
    shared from the host for the whole pod when the subPath comes first; after the volume went into the
    guest, a subPath of it would split its files, so it is refused naming the mount."""
    parent = _parent(tmp_path)
    for name in ("first", "later"):
        (parent / name).mkdir(parents=True)
    config = Config()
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, kubelet_root_dir=str(tmp_path)))
    sb = Sandbox("sb", config, tmp_path / "sb")
    sub = f"{tmp_path}/pods/{UID}/volume-subpaths"
    assert sb._pod_volumes("pause", _spec(UID)) == {}
    assert sb._pod_volumes("c1", _spec(UID, f"{sub}/first/c1/0", f"{parent}/first")) == {}
    assert sb._pod_volumes("c2", _spec(UID, f"{parent}/first")) == {}
    assert list(sb._pod_volumes("c3", _spec(UID, f"{parent}/later"))) == [0]
    with pytest.raises(InvalidArgument) as info:
        sb._pod_volumes("c4", _spec(UID, "/etc", f"{sub}/later/c4/0"))
    assert info.value.field == "mounts[1].source" and "subPath" in str(info.value)


def test_medium_is_read_from_the_host_mount(tmp_path: Path) -> None:
    """A tmpfs on the volume's directory is `medium: Memory` (its size kept); a mount of another file
    system (here ramfs, as hugetlbfs for `medium: HugePages`) is left on the host."""
    parent = _parent(tmp_path)
    for name in ("mem", "huge"):
        (parent / name).mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0777", "tmpfs", str(parent / "mem")], check=True)
    try:
        subprocess.run(["mount", "-t", "ramfs", "ramfs", str(parent / "huge")], check=True)
        try:
            assert emptydir.inspect(str(parent / "mem"), "mem", "f") == EmptyDir(
                "mem", memory=True, mode=0o777, uid=0, gid=0, host_size_mib=8)
            assert emptydir.inspect(str(parent / "huge"), "huge", "f") is None
        finally:
            subprocess.run(["umount", str(parent / "huge")], check=True)
    finally:
        subprocess.run(["umount", str(parent / "mem")], check=True)
