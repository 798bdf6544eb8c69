"""Sandbox cgroups on this host's layout (cgroup v1 controllers plus a v2 `unified/`, or whatever
/sys/fs/cgroup is) and on pure cgroup v2 (a private cgroup2 mount): made in every hierarchy, a
process moved in, everything made removed again."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from pykata.resources import cgroups
from pykata.resources.cgroups import SandboxCgroup, cgroup_path, hierarchies

HOST_ROOT = Path("/sys/fs/cgroup")


@pytest.fixture
def cgroup2(tmp_path: Path) -> Iterator[Path]:
    """A private cgroup2 mount: pure v2 whatever the host boots with."""
    mnt = tmp_path / "cgroup2"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _cgroups_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cgroup").read_text().splitlines()


def _exercise(root: Path) -> list[cgroups.Hierarchy]:
    top = f"pykata-test-{uuid.uuid4().hex[:8]}"
    path = PurePosixPath(top, "pod", "sandbox")
    cg = SandboxCgroup.create(root, path)
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert cg.hierarchies and all(cg.directory(h).is_dir() for h in cg.hierarchies)
        cg.add_process(child.pid)
        for h in cg.hierarchies:
            assert str(child.pid) in (cg.directory(h) / "cgroup.procs").read_text().split()
        if root == HOST_ROOT:
            assert sum(line.endswith(f"/{path}") for line in _cgroups_of(child.pid)) == len(cg.hierarchies)
    finally:
        child.kill()
        child.wait()
    cg.remove()
    assert not any((h.mountpoint / top).exists() for h in cg.hierarchies)
    cg.remove()  # idempotent
    return cg.hierarchies


def test_host_layout() -> None:
    found = _exercise(HOST_ROOT)
    if not (HOST_ROOT / "cgroup.controllers").exists():  # this host: v1 controllers (+ v2 unified/)
        assert any(h.version == 1 and "memory" in h.options for h in found)
        assert any(h.version == 1 and "cpuset" in h.options for h in found)  # needs cpus/mems set


def test_pure_v2(cgroup2: Path) -> None:
    assert hierarchies(cgroup2) == [cgroups.Hierarchy(cgroup2, 2)]
    _exercise(cgroup2)


def test_existing_levels_are_kept(cgroup2: Path) -> None:
    # (a cgroup2 mount shows the host's one v2 hierarchy: names are unique so as not to meet others')
    pod = cgroup2 / f"pykata-test-{uuid.uuid4().hex[:8]}" / "pod1"
    pod.mkdir(parents=True)  # kubelet's
    cg = SandboxCgroup.create(cgroup2, PurePosixPath(pod.relative_to(cgroup2), "sb"))
    assert cg.created == [pod / "sb"]
    cg.remove()
    assert pod.is_dir() and not (pod / "sb").exists()
    pod.rmdir()
    pod.parent.rmdir()


def test_paths() -> None:
    assert cgroup_path("/kubepods/burstable/pod1/abc", "abc", pod_only=True) == \
        PurePosixPath("kubepods/burstable/pod1/abc")
    # without sandbox_cgroup_only: beside the pod's cgroup, in the pods' tree (node allocatable)
    assert cgroup_path("/kubepods/pod1/abc", "abc", pod_only=False) == PurePosixPath("kubepods/pykata_overhead/abc")
    assert cgroup_path("/kubepods/burstable/pod1/abc", "abc", pod_only=False) == \
        PurePosixPath("kubepods/burstable/pykata_overhead/abc")
    assert cgroup_path("kubepods-burstable-pod1.slice:cri-containerd:abc", "abc", pod_only=False) == \
        PurePosixPath("kubepods.slice/kubepods-burstable.slice/pykata_overhead/abc")
    assert cgroup_path("/default/abc", "abc", pod_only=False) == PurePosixPath("pykata_overhead/abc")  # ctr's
    assert cgroup_path(None, "abc", pod_only=False) == PurePosixPath("pykata_overhead/abc")
    with pytest.raises(cgroups.CgroupError, match="leave the cgroup tree"):
        cgroup_path("/kubepods/../../x/abc", "abc", pod_only=False)
    assert SandboxCgroup(PurePosixPath("kubepods/burstable/pykata_overhead/abc"), []).owned
    assert cgroup_path("", "abc", pod_only=True) == PurePosixPath("pykata_overhead/abc")
    assert cgroup_path("kubepods-burstable-pod1.slice:cri-containerd:abc", "abc", pod_only=True) == \
        PurePosixPath("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/"
                      "cri-containerd-abc.scope")


def test_recorded_leftovers_are_removed_only_below_the_root(cgroup2: Path, tmp_path: Path) -> None:
    top = f"pykata-test-{uuid.uuid4().hex[:8]}"
    cg = SandboxCgroup.create(cgroup2, PurePosixPath(top, "dead"))
    outside = tmp_path / "not-a-cgroup"
    outside.mkdir()
    record = cg.record()[:-1] + f', "{outside}", "{cgroup2}/../not-a-cgroup"]'
    cgroups.remove_recorded(record, cgroup2)
    assert not (cgroup2 / top).exists()
    assert outside.is_dir()


def test_join_and_leave_move_this_process(cgroup2: Path, tmp_path: Path) -> None:
    # in the v2 hierarchy only (no controllers on this host): this process goes in and comes back
    from pykata.config import RuntimeConfig

    runtime = RuntimeConfig(cgroup_root=str(cgroup2), runtime_dir=str(tmp_path / "run"))
    before = [ln for ln in _cgroups_of(os.getpid()) if ln.startswith("0::")]
    sandbox_id = f"sb-{uuid.uuid4().hex[:8]}"
    # without sandbox_cgroup_only: beside the pod's cgroup (pods/pod1), not in it
    cg = cgroups.join(runtime, f"/pods/pod1/{sandbox_id}", sandbox_id)
    record = tmp_path / "run" / "cgroups" / f"{sandbox_id}.json"
    try:
        assert f"0::/pods/pykata_overhead/{sandbox_id}" in _cgroups_of(os.getpid())
        assert not (cgroup2 / "pods" / "pod1").exists()
        assert record.stat().st_mode & 0o777 == 0o600
    finally:
        cgroups.leave(cg, runtime, sandbox_id)
    assert [ln for ln in _cgroups_of(os.getpid()) if ln.startswith("0::")] == before
    assert not (cgroup2 / "pods").exists() and not record.exists()  # all it made, and only that


def test_limits_only_on_pykatas_own_cgroup() -> None:
    """set_limits writes memory and CPU limits where this host has those controllers (v1 here, v2
    elsewhere; a hybrid host's controller-less unified/ is skipped), reads back through usage(), and
    refuses the pod's own cgroup (kubelet's)."""
    sid = f"pykata-test-{uuid.uuid4().hex[:8]}"
    cg = SandboxCgroup.create(HOST_ROOT, PurePosixPath(cgroups.OVERHEAD, sid))
    try:
        assert cg.owned
        cg.set_limits(memory_bytes=640 << 20, cpu_quota_us=150_000)
        got = cg.usage()
        assert got["memory_limit_bytes"] == 640 << 20 and got["cpu_quota_us"] == 150_000, got
        cg.set_limits(memory_bytes=512 << 20)  # one at a time: the other stays
        assert cg.usage()["memory_limit_bytes"] == 512 << 20 and cg.usage()["cpu_quota_us"] == 150_000
    finally:
        cg.remove()
    pod = SandboxCgroup(PurePosixPath("kubepods", "pod1"), [])
    assert not pod.owned
    with pytest.raises(cgroups.CgroupError, match="kubelet"):
        pod.set_limits(memory_bytes=1 << 30)


@pytest.fixture
def read_only_cgroup2(cgroup2: Path, tmp_path: Path) -> Iterator[Path]:
    """A real cgroup2 hierarchy seen through a read-only bind mount: no cgroup can be made below it
    (mkdir fails with EROFS), as on a host whose cgroupfs pykata may not write."""
    ro = tmp_path / "cgroup2-ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(cgroup2), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_cgroup_that_cannot_be_made_fails_the_sandbox(read_only_cgroup2: Path, tmp_path: Path) -> None:
    """The shim's join_cgroup fails (naming the cgroup's path and the cause) when the sandbox's cgroup
    cannot be made, as Kata: a VM outside it is charged to no limit of the pod. Nothing is left made,
    this process stays where it was. runtime.allow_uncharged_sandbox = true runs it uncharged instead."""
    from types import SimpleNamespace

    from pykata.config import Config, RuntimeConfig
    from pykata.shim.tasks.pod import join_cgroup

    sandbox_id = f"sb-{uuid.uuid4().hex[:8]}"
    spec = {"linux": {"cgroupsPath": f"/pykata-test-pods/pod1/{sandbox_id}"}}
    before = _cgroups_of(os.getpid())
    for allow in (False, True):
        runtime = RuntimeConfig(cgroup_root=str(read_only_cgroup2), runtime_dir=str(tmp_path / "run"),
                                allow_uncharged_sandbox=allow)
        st = SimpleNamespace(sandbox_id=sandbox_id, cgroup=None)
        if allow:
            join_cgroup(st, Config(runtime=runtime), spec)  # type: ignore[arg-type]
        else:
            with pytest.raises(cgroups.CgroupError) as err:
                join_cgroup(st, Config(runtime=runtime), spec)  # type: ignore[arg-type]
            message = str(err.value)
            assert f"pykata-test-pods/pykata_overhead/{sandbox_id}" in message, message
            assert f"{read_only_cgroup2}/pykata-test-pods" in message and "Read-only file system" in message, message
        assert st.cgroup is None
        assert _cgroups_of(os.getpid()) == before
        assert not (read_only_cgroup2 / "pykata-test-pods").exists()
        assert not list((tmp_path / "run" / "cgroups").glob("*"))


def test_a_cap_the_kernel_refuses_fails_the_sandbox(caplog: pytest.LogCaptureFixture) -> None:
    """The shim's boot_limits fails, naming the cgroup and the cause, when the kernel refuses the cap on
    the sandbox's own cgroup (pykata_overhead/<id>); it only logged a warning and the VM booted uncapped.
    As join_cgroup: runtime.allow_uncharged_sandbox = true goes on with a warning instead, and a cap that
    only narrows (after the VM shrank) is logged either way, the wider one staying. The refusal is the
    kernel's: under a cgroup v1 cpu parent with a quota of half a CPU, a child's larger quota is EINVAL."""
    from types import SimpleNamespace

    from pykata.config import Config, RuntimeConfig
    from pykata.shim.tasks import resize

    cpu = HOST_ROOT / "cpu"
    assert (cpu / "cpu.cfs_quota_us").exists(), "needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu (this host's)"
    top = f"pykata-test-{uuid.uuid4().hex[:8]}"
    sid = f"sb-{uuid.uuid4().hex[:8]}"
    (cpu / top).mkdir()
    try:
        (cpu / top / "cpu.cfs_quota_us").write_text("50000")
        cg = SandboxCgroup.create(HOST_ROOT, PurePosixPath(top, cgroups.OVERHEAD, sid))
        try:
            assert cg.owned
            for allow in (False, True):
                config = Config(runtime=RuntimeConfig(allow_uncharged_sandbox=allow))
                st = SimpleNamespace(cgroup=(cg, config), sandbox=None)
                caplog.clear()
                if allow:
                    resize.boot_limits(st, config)  # type: ignore[arg-type]
                    assert "allow_uncharged_sandbox" in caplog.text and "Invalid argument" in caplog.text
                else:
                    with pytest.raises(cgroups.CgroupError) as err:
                        resize.boot_limits(st, config)  # type: ignore[arg-type]
                    message = str(err.value)
                    assert f"{top}/{cgroups.OVERHEAD}/{sid}" in message and "cpu.cfs_quota_us" in message, message
                    assert "Invalid argument" in message, message
                caplog.clear()
                resize._host_limits(st, 256, 1, narrowing=True)  # type: ignore[arg-type]
                assert "not narrowed" in caplog.text, caplog.text
        finally:
            cg.remove()
    finally:
        (cpu / top).rmdir()
    assert not any((h.mountpoint / top).exists() for h in cgroups.hierarchies(HOST_ROOT))
