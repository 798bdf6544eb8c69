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
    return _run_pod_config(cri, config)


def _run_pod_config(cri: Cri, config: api_pb2.PodSandboxConfig) -> str:
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
    """A sandbox cgroup that cannot be made fails the pod, as Kata's: the cgroup root is a real cgroup2
    hierarchy through a read-only bind mount (mkdir: EROFS), and the error names the cgroup's path and
    the cause; no VM starts and nothing is left. With runtime.allow_uncharged_sandbox = true (an admin's
    file, through io.katacontainers.config_path) the pod runs, uncharged, in the shim's cgroup."""
    mnt = tmp_path_factory.mktemp("cgroup2")
    read_only = tmp_path_factory.mktemp("cgroup2-ro")
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], check=True)
    ctd = None
    try:
        subprocess.run(["mount", "--bind", str(mnt), str(read_only)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
        parent = f"pykata-test-kubepods-{uuid.uuid4().hex[:8]}"
        ctd = _containerd(tmp_path_factory.mktemp("cri-nocg"), tmp_path_factory.mktemp("cache"),
                          cgroup_root=f'"{read_only}"')
        uncharged = admin_config(ctd.pod_configs / "uncharged.toml", cgroup_root=f'"{read_only}"',
                                 allow_uncharged_sandbox="true")
        with Cri(ctd.socket) as cri:
            name = f"cg-{uuid.uuid4().hex[:8]}"
            config = api_pb2.PodSandboxConfig(
                metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"),
                hostname=name, linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=f"/{parent}/pod1"))
            with pytest.raises(grpc.RpcError) as info:
                cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler="pykata"),
                                     timeout=cri.timeout)
            details = str(info.value.details())
            assert f"{parent}/pykata_overhead/" in details and f"{read_only}/{parent}" in details, details
            assert "Read-only file system" in details, details
            assert not [p for p in cri.list_pods() if p.metadata.name == name]
            assert not ctd.shims()
            config.annotations["io.katacontainers.config_path"] = str(uncharged)
            pod_id = _run_pod_config(cri, config)
            _end_pod(ctd, cri, pod_id)
        assert not list(mnt.glob(f"{parent}*"))
    finally:
        if ctd is not None:
            ctd.stop()
            assert not ctd.shims()
        subprocess.run(["umount", str(read_only)], check=False)
        subprocess.run(["umount", str(mnt)], check=True)
