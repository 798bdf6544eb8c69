"""A CRI pod's emptyDir volumes are made in the guest (pykata.resources.emptydir): shared by the pod's
containers that mount them (a write, a MAP_SHARED mapping and inotify cross from one container to the
other), the host directory untouched, kept across a container's removal, gone with the pod; crafted
paths are refused naming the field, and host paths that only look like an emptyDir stay host binds.

kubelet is played by the test: it makes <kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>
(a tmpfs mounted there for `medium: Memory`) under a temp directory that the admin configuration names
as runtime.kubelet_root_dir, and passes it as a CRI mount, as kubelet does."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import Cri, CriContainerd
from tests.cri.test_pod_config import _container, _pod, _pod_config, _sh

pytestmark = [pytest.mark.vm]
PROBE = Path(__file__).with_name("data") / "shareprobe.c"
EMPTY_DIR = "kubernetes.io~empty-dir"


@pytest.fixture(scope="module")
def ctd(kubelet_containerd: CriContainerd) -> CriContainerd:
    return kubelet_containerd


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host directory with the static probe, mounted read-only into the containers (a hostPath)."""
    d = tmp_path_factory.mktemp("tools")
    subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "shareprobe"), str(PROBE)], check=True)
    return d


def _volume_dir(kubelet_root: Path, uid: str, name: str) -> Path:
    d = kubelet_root / "pods" / uid / "volumes" / EMPTY_DIR / name
    d.mkdir(parents=True)
    d.chmod(0o777)  # as kubelet makes it
    return d


@pytest.fixture
def memory_volume(kubelet_root: Path) -> Iterator[tuple[str, Path]]:
    """A `medium: Memory` emptyDir as kubelet makes it: a 32 MiB tmpfs (its sizeLimit) on the volume's dir."""
    uid = f"uid-ed-{uuid.uuid4().hex[:6]}"
    d = _volume_dir(kubelet_root, uid, "mem")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0777,nosuid,nodev", "tmpfs", str(d)], check=True)
    try:
        yield uid, d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def _mount(container_path: str, host: Path, readonly: bool = False) -> Any:
    return api_pb2.Mount(container_path=container_path, host_path=str(host), readonly=readonly)


def _while_waiting(cri: Cri, waiter: str, armed_by: str, wait: list[str], act: str) -> str:
    """Run `wait` (an argv) in container `waiter`; once it made /mem/armed (seen from `armed_by`),
    run the shell `act` in `armed_by`; returns what the wait printed."""
    _sh(cri, armed_by, "rm -f /mem/armed")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(cri.exec_sync, waiter, wait, 60)
        deadline = time.monotonic() + 60
        while cri.exec_sync(armed_by, ["test", "-e", "/mem/armed"]).exit_code != 0:
            assert time.monotonic() < deadline and not waiting.done(), "the wait never armed"
            time.sleep(0.2)
        _sh(cri, armed_by, act)
        reply = waiting.result(timeout=90)
    return str(reply.stdout.decode()).strip()


def test_two_containers_share_the_pods_emptydirs_in_the_guest(
        ctd: CriContainerd, kubelet_root: Path, tools: Path, memory_volume: tuple[str, Path]) -> None:
    uid, mem = memory_volume
    name = uid.removeprefix("uid-")
    disk = _volume_dir(kubelet_root, uid, "cache")
    config = _pod_config(name)
    assert config.metadata.uid == uid
    mounts = [_mount("/cache", disk), _mount("/mem", mem), _mount("/tools", tools, readonly=True)]
    with Cri(ctd.socket) as cri, _pod(ctd, cri, "pykata", config) as pod_id:
        c0 = _container(cri, pod_id, config, "c0", mounts=mounts)
        c1 = _container(cri, pod_id, config, "c1", mounts=mounts)
        for cid in (c0, c1):
            # guest tmpfs, the host directory's mode; Memory bounded by the host tmpfs's 32 MiB
            assert _sh(cri, cid, "stat -f -c %T /cache /mem").split() == ["tmpfs", "tmpfs"]
            assert _sh(cri, cid, "stat -c %a /cache /mem").split() == ["777", "777"]
            assert _sh(cri, cid, "df -k /mem | tail -1").split()[1] == str(32 * 1024)
        # a write in one container is seen by the other
        _sh(cri, c0, "echo from-c0 > /cache/note && mkdir /cache/d && echo m > /mem/m")
        assert _sh(cri, c1, "cat /cache/note /mem/m") == "from-c0\nm\n"
        # MAP_SHARED: c1 maps the file and waits; c0 writes only into its own mapping of it
        seen = _while_waiting(cri, c1, c0, ["/tools/shareprobe", "mmap-wait", "/cache/shm", "hello", "30",
                                            "/mem/armed"], "/tools/shareprobe mmap-put /cache/shm hello")
        assert seen == "seen"
        # inotify: c1 watches the directory, c0 creates a file in it
        seen = _while_waiting(cri, c1, c0, ["/tools/shareprobe", "inotify", "/cache/d", "30", "/mem/armed"],
                              "touch /cache/d/made-by-c0")
        assert seen == "made-by-c0"
        # bounded: the Memory volume by its 32 MiB; what is written is the VM's memory (the guest's Shmem)
        assert "No space left on device" in _sh(cri, c0, "dd if=/dev/zero of=/mem/big bs=1M count=40", ok=False)
        _sh(cri, c0, "rm /mem/big")
        shmem = "awk '/^Shmem:/ {print $2}' /proc/meminfo"
        before = int(_sh(cri, c0, shmem))
        _sh(cri, c0, "dd if=/dev/zero of=/cache/16m bs=1M count=16")
        grown = int(_sh(cri, c0, shmem)) - before
        assert grown >= 15 << 10, grown
        _sh(cri, c0, "rm /cache/16m")
        # nothing of it on the host
        assert list(disk.iterdir()) == [] and list(mem.iterdir()) == []
        # the volume lives with the pod, not with a container: c0 and c1 removed, a new one finds it
        for cid in (c0, c1):
            cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1), timeout=cri.timeout)
            cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=cri.timeout)
        c2 = _container(cri, pod_id, config, "c2", mounts=mounts[:2])
        assert _sh(cri, c2, "cat /cache/note /mem/m") == "from-c0\nm\n"
    # the pod is gone (its leftovers checked by _pod): the host directories are as kubelet made them
    assert list(disk.iterdir()) == [] and list(mem.iterdir()) == []


def test_crafted_or_lookalike_emptydir_paths(ctd: CriContainerd, kubelet_root: Path, tmp_path: Path) -> None:
    """A path under the pod's emptyDir directory that kubelet would never make is refused naming the
    mount; a host directory that only looks like an emptyDir (elsewhere, another pod's, or one that
    already holds files) stays a host bind: its files are seen and what the container writes lands there."""
    name = f"edx-{uuid.uuid4().hex[:6]}"
    uid = f"uid-{name}"
    config = _pod_config(name)
    elsewhere = tmp_path / "data" / EMPTY_DIR / "vol"
    other_pods = _volume_dir(kubelet_root, f"uid-other-{name}", "vol")
    prefilled = _volume_dir(kubelet_root, uid, "prefilled")
    for d in (elsewhere, other_pods, prefilled):
        d.mkdir(parents=True, exist_ok=True)
        (d / "kept").write_text("user data\n")
    bad = kubelet_root / "pods" / uid / "volumes" / EMPTY_DIR / "Not_A_Label"
    bad.mkdir(parents=True)
    with Cri(ctd.socket) as cri, _pod(ctd, cri, "pykata", config) as pod_id:
        with pytest.raises(grpc.RpcError) as info:
            _container(cri, pod_id, config, "bad", mounts=[_mount("/x", bad)])
        assert "mounts[" in str(info.value.details()) and ".source" in str(info.value.details())
        assert "Not_A_Label" in str(info.value.details())
        cid = _container(cri, pod_id, config, "c0", mounts=[
            _mount("/a", elsewhere), _mount("/b", other_pods), _mount("/c", prefilled)])
        for where, host in (("/a", elsewhere), ("/b", other_pods), ("/c", prefilled)):
            assert _sh(cri, cid, f"cat {where}/kept") == "user data\n"
            _sh(cri, cid, f"echo written > {where}/new && sync")
            assert (host / "new").read_text() == "written\n"
    for d in (elsewhere, other_pods, prefilled):
        assert (d / "kept").read_text() == "user data\n"
    assert list(bad.iterdir()) == []
