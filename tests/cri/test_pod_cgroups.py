"""Where a pod's VM is charged on the host (runtime.sandbox_cgroup_only), through containerd's CRI:
the shim, QEMU and virtiofsd (if any) in the pod's cgroup (`<cgroup_parent>/<pod id>`) on this host's
layout, or in pykata_overhead/<pod id> on pure cgroup v2 (a private cgroup2 mount as cgroup_root);
every cgroup made for the pod is gone after it."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import grpc
import psutil
import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import Cri, CriContainerd, admin_config, missing_cri_prerequisites, wait_gone


def _containerd(directory: Path, cache: Path, **runtime: str) -> CriContainerd:
    missing = missing_cri_prerequisites()
    if missing:
        pytest.fail(f"the CRI tests need {missing}")
    ctd = CriContainerd(directory, runtime_config=runtime)
    ctd.start()
    ctd.import_images(cache)
    return ctd


def _pod_processes(ctd: CriContainerd) -> list[psutil.Process]:
    shims = ctd.shims()
    assert len(shims) == 1, shims
    found = [shims[0], *shims[0].children(recursive=True)]
    assert any("qemu-system" in p.name() for p in found), [p.cmdline() for p in found]
    return found


def _run_pod(cri: Cri, cgroup_parent: str) -> str:
    name = f"cg-{uuid.uuid4().hex[:8]}"
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"),
        hostname=name, linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent))
    reply = cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler="pykata"),
                                 timeout=cri.timeout)
    return str(reply.pod_sandbox_id)


def _end_pod(ctd: CriContainerd, cri: Cri, pod_id: str) -> None:
    try:
        cri.stop_pod(pod_id)
    finally:
        cri.remove_pod(pod_id)
    left = wait_gone(ctd, pod_id)
    assert not left, f"pod {pod_id} left {left}"


@pytest.mark.vm
def test_host_layout_pod_cgroup(tmp_path_factory: pytest.TempPathFactory) -> None:
    ctd = _containerd(tmp_path_factory.mktemp("cri-cg"), tmp_path_factory.mktemp("cache"),
                      sandbox_cgroup_only="true")
    top = f"pykata-test-{uuid.uuid4().hex[:8]}"
    try:
        with Cri(ctd.socket) as cri:
            pod_id = _run_pod(cri, f"/{top}/pod")
            try:
                want = f"/{top}/pod/{pod_id}"
                for p in _pod_processes(ctd):
                    lines = Path(f"/proc/{p.pid}/cgroup").read_text().splitlines()
                    memory = [ln for ln in lines if ln.split(":")[1] in ("memory", "")]
                    assert memory and all(ln.endswith(want) for ln in memory), (p.cmdline()[:2], lines)
            finally:
                _end_pod(ctd, cri, pod_id)
    finally:
        ctd.stop()
    root = Path("/sys/fs/cgroup")
    assert not [str(d) for d in (root.glob(f"*/{top}") if not (root / "cgroup.controllers").exists()
                                 else [root / top]) if d.exists()]


@pytest.mark.vm
def test_pure_v2_overhead_cgroup(tmp_path_factory: pytest.TempPathFactory) -> None:
    mnt = tmp_path_factory.mktemp("cgroup2")
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], check=True)
    ctd = None
    try:
        parent = f"pykata-test-kubepods-{uuid.uuid4().hex[:8]}"
        ctd = _containerd(tmp_path_factory.mktemp("cri-cg2"), tmp_path_factory.mktemp("cache"),
                          cgroup_root=f'"{mnt}"')
        with Cri(ctd.socket) as cri:
            # beside the pod's cgroup (<parent>/pod1), in the pods' tree
            pod_id = _run_pod(cri, f"/{parent}/pod1")
            try:
                procs = mnt / parent / "pykata_overhead" / pod_id / "cgroup.procs"
                for p in _pod_processes(ctd):
                    assert str(p.pid) in procs.read_text().split()
                assert not (mnt / parent / "pod1").exists()
            finally:
                _end_pod(ctd, cri, pod_id)
        assert not (mnt / parent).exists()  # every level it made, and only those, removed
    finally:
        if ctd is not None:
            ctd.stop()
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.vm
def test_unwritable_cgroup_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No cgroup hierarchy at runtime.cgroup_root: the overhead cgroup is bookkeeping, so the pod runs
    (in the shim's cgroup); with sandbox_cgroup_only the pod fails naming the setting, and no VM starts."""
    not_cgroups = tmp_path_factory.mktemp("not-cgroups")
    ctd = _containerd(tmp_path_factory.mktemp("cri-nocg"), tmp_path_factory.mktemp("cache"),
                      cgroup_root=f'"{not_cgroups}"')
    try:
        strict = admin_config(ctd.pod_configs / "strict.toml", cgroup_root=f'"{not_cgroups}"',
                              sandbox_cgroup_only="true")
        with Cri(ctd.socket) as cri:
            pod_id = _run_pod(cri, "")
            _end_pod(ctd, cri, pod_id)
            name = f"cg-{uuid.uuid4().hex[:8]}"
            config = api_pb2.PodSandboxConfig(
                metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"),
                hostname=name, annotations={"io.katacontainers.config_path": str(strict)})
            with pytest.raises(grpc.RpcError) as info:
                cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler="pykata"),
                                     timeout=cri.timeout)
            assert "runtime.cgroup_root: " in str(info.value.details()), info.value.details()
            assert not [p for p in cri.list_pods() if p.metadata.name == name]
        assert not list(not_cgroups.iterdir())
    finally:
        ctd.stop()
        assert not ctd.shims()
