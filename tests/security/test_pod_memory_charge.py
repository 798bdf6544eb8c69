"""A pod grows its VM up to the admin's `default_maxmemory` and fills it, without
`sandbox_cgroup_only` (the default): the VM must be charged to the pods' cgroup tree, so the limit
kubelet puts on all pods (node allocatable, on kubepods) bounds it, as it bounds a runc pod.

Before the fix the VM was charged to `pykata_overhead/<id>` at the root of the hierarchy, outside
kubepods: a pod whose limits reach the VM's ceiling (up to 1 TiB by admin choice) could take the memory
the node keeps for the system. Bounded here: the ceiling is 1 GiB, the stand-in for kubepods (a cgroup
of this test's own, the pod's cgroup parent below it) allows 600 MiB, and the guest fills 800 MiB. The
sandbox's processes must be charged below the stand-in and never pass its limit (the host's kernel
ends QEMU within it: the pod dies, not the node), and nothing of the pod is left.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd, running_cri_containerd, wait_gone

MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")
ALLOCATABLE = 600 << 20


@pytest.fixture(scope="module")
def ctd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    with running_cri_containerd(tmp_path_factory.mktemp("crimem"), tmp_path_factory.mktemp("cache"),
                                extra_config="hypervisor.qemu.default_memory = 256\n"
                                             "hypervisor.qemu.default_maxmemory = 1024\n"
                                             "factory.enable_template = false") as ctd:
        yield ctd


@pytest.fixture
def kubepods() -> Iterator[str]:
    """A memory cgroup of this test's own standing for kubelet's kubepods, limited like node allocatable."""
    if not (MEMORY_CGROUPS / "memory.limit_in_bytes").exists():
        pytest.fail("this test expects the cgroup v1 memory hierarchy of the CI hosts at /sys/fs/cgroup/memory")
    name = f"pykata-test-kubepods-{uuid.uuid4().hex[:8]}"
    top = MEMORY_CGROUPS / name
    top.mkdir()
    try:
        (top / "memory.limit_in_bytes").write_text(str(ALLOCATABLE))
        yield name
    finally:
        deadline = time.monotonic() + 20
        while True:
            try:
                for d in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                    if d.is_dir():
                        d.rmdir()
                top.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.mark.vm
def test_a_pod_growing_its_vm_to_the_ceiling_stays_within_the_pods_tree(ctd: CriContainerd, kubepods: str) -> None:
    top = MEMORY_CGROUPS / kubepods
    name = f"mem-{uuid.uuid4().hex[:8]}"
    pod_config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"), hostname=name,
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"/{kubepods}/pod-{name}"))
    with Cri(ctd.socket) as cri:
        pod_id = cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config, runtime_handler="pykata"),
                                      timeout=cri.timeout).pod_sandbox_id
        try:
            # the shim and its QEMU are charged beside the pod's cgroup, in the pods' tree
            shims = ctd.shims()
            assert len(shims) == 1
            lines = Path(f"/proc/{shims[0].pid}/cgroup").read_text().splitlines()
            cgroup = next(line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory")
            assert cgroup == f"/{kubepods}/pykata_overhead/{pod_id}", cgroup
            config = api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name="hog"), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
                command=["sleep", "3600"],
                linux=api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(
                    memory_limit_in_bytes=1000 << 20)))
            cid = cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=cri.timeout).container_id
            cri.start_container(cid)
            # the VM grew to its ceiling for the pod's limit; the guest fills 800 MiB (dd's buffer)
            with contextlib.suppress(grpc.RpcError):  # the VM (or dd) is killed: whichever, the bound held
                cri.exec_sync(cid, ["dd", "if=/dev/zero", "of=/dev/null", "bs=800M", "count=1"], timeout=120)
            peak = int((top / "memory.max_usage_in_bytes").read_text())
            assert 100 << 20 < peak <= ALLOCATABLE, peak  # charged there, and bounded by it
            assert int((top / "memory.failcnt").read_text()) > 0, "the guest never reached the bound"
        finally:
            with contextlib.suppress(grpc.RpcError):
                cri.stop_pod(pod_id)
            # containerd records the exits of a pod whose VM the host's kernel ended a moment after
            # StopPodSandbox returns; kubelet retries RemovePodSandbox, so does this test
            deadline = time.monotonic() + 30
            while True:
                try:
                    cri.remove_pod(pod_id)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
    left = wait_gone(ctd, pod_id)
    assert not left, f"pod {pod_id} left {left}"
    assert not (top / "pykata_overhead").exists()
