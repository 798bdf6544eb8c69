"""An elastic pod through containerd's CRI (Kata CI's TestContainerMemoryUpdate, and more): the VM follows
UpdateContainerResources 2 -> 4 -> 3 GiB (the guest's MemTotal within 128 MiB of each limit, the
container's memory.max in the guest equal to it, QEMU's RSS dropping on the shrink), 1 -> 4 -> 2 CPUs
(`nproc` in the container and the host cgroup's quota follow), a memory-only update (what
`ctr task update --memory-limit` sends), and a container joining the running pod grows the VM by its
limits and leaving shrinks it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cri_api.v1 import api_pb2

from pykata.config import load_config_file
from pykata.factory import ensure_template
from pykata.resources import sizing
from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd, missing_cri_prerequisites, wait_gone

pytestmark = [pytest.mark.vm]
GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture(scope="module")
def elastic_containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    missing = missing_cri_prerequisites()
    if missing:
        pytest.fail(f"the CRI tests need {missing}")
    # room for a 4 GiB container: the VM boots with its 4.5 GiB ceiling behind the balloon (TCG touches
    # no guest page the guest does not use)
    # its own template directory (made here, removed after): a 4.5 GiB-ceiling template is ~350 MiB of tmpfs
    templates = Path(tempfile.mkdtemp(prefix="pkrs", dir="/run"))
    ctd = CriContainerd(tmp_path_factory.mktemp("cri-rs"), runtime_config={
        "default_memory": "512", "default_maxmemory": str(4 * 1024 + sizing.VM_MEMORY_OVERHEAD_MIB + 256),
        "default_maxvcpus": "4", "template_path": f'"{templates}"',
        # the template of a 4.75 GiB, 4-vCPU VM on a loaded 2-core machine boots in well over 30 s
        "boot_timeout": "120.0"})
    try:
        ctd.start()
        ctd.import_images(tmp_path_factory.mktemp("cache"))
        # made before the pod, so RunPodSandbox's 60 s deadline is not spent booting the template
        asyncio.run(ensure_template(load_config_file(ctd.dir / "pykata.toml"), nics=1))
        yield ctd
    finally:
        ctd.stop()
        shutil.rmtree(templates, ignore_errors=True)
        assert not ctd.shims()


def _resources(memory: int, cpus: int) -> api_pb2.LinuxContainerResources:
    return api_pb2.LinuxContainerResources(memory_limit_in_bytes=memory, cpu_period=100_000,
                                           cpu_quota=cpus * 100_000)


def _container(cri: Cri, pod_id: str, pod_config: api_pb2.PodSandboxConfig, name: str,
               resources: api_pb2.LinuxContainerResources) -> str:
    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name),
                                     image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE), command=["sleep", "3600"],
                                     linux=api_pb2.LinuxContainerConfig(resources=resources))
    cid = str(cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=cri.timeout).container_id)
    cri.start_container(cid)
    return cid


def _sh(cri: Cri, cid: str, script: str, timeout: int = 30) -> str:
    reply = cri.exec_sync(cid, ["sh", "-c", script], timeout=timeout)
    assert reply.exit_code == 0, (script, reply.stderr)
    return reply.stdout.decode()


def _mem_total_mib(cri: Cri, cid: str) -> int:
    return int(_sh(cri, cid, "grep MemTotal /proc/meminfo").split()[1]) // 1024


def _guest_memory_limit(pod_id: str, cid: str) -> int:
    """The container's memory.max in the guest, from the agent's StatsContainer (`pykata agent-ctl`)."""
    out = subprocess.run([str(Path(sys.executable).parent / "pykata"), "agent-ctl", pod_id, "StatsContainer",
                          json.dumps({"containerId": cid})], capture_output=True, check=True, timeout=60).stdout
    return int(json.loads(out)["cgroupStats"]["memory"]["limit"])


def _qemu(ctd: CriContainerd) -> psutil.Process:
    shims = ctd.shims()
    assert len(shims) == 1
    found = [p for p in shims[0].children(recursive=True) if "qemu-system" in p.name()]
    assert len(found) == 1
    return found[0]


def _host_quota(ctd: CriContainerd, pod_id: str) -> str:
    for d in (Path("/sys/fs/cgroup/cpu/pykata_overhead") / pod_id, Path("/sys/fs/cgroup/pykata_overhead") / pod_id):
        for name in ("cpu.cfs_quota_us", "cpu.max"):
            if (d / name).exists():
                return (d / name).read_text().split()[0]
    raise AssertionError("no host cgroup of the pod")


def test_pod_follows_updates_joins_and_leaves(elastic_containerd: CriContainerd) -> None:
    ctd = elastic_containerd
    with Cri(ctd.socket) as cri:
        name = f"rs-{uuid.uuid4().hex[:8]}"
        pod_config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"),
            hostname=name, linux=api_pb2.LinuxPodSandboxConfig())
        pod_id = str(cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config, runtime_handler="pykata"),
                                          timeout=cri.timeout).pod_sandbox_id)
        try:
            cid = _container(cri, pod_id, pod_config, "app", _resources(2 * GIB, 1))
            qemu = _qemu(ctd)
            sizes = []
            mem_totals: list[tuple[int, int]] = []
            # Kata's TestContainerMemoryUpdate: 2 -> 4 -> 3 GiB; CPUs 1 -> 4 -> 2 with them
            for memory_gib, cpus in ((2, 1), (4, 4), (3, 2)):
                if (memory_gib, cpus) != (2, 1):
                    started = time.monotonic()
                    cri.rt.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
                        container_id=cid, linux=_resources(memory_gib * GIB, cpus)), timeout=cri.timeout)
                    sizes.append((memory_gib, round(time.monotonic() - started, 2)))
                # the VM is the limit plus the guest's own share; the guest's kernel and struct pages
                # (for the ceiling) come out of that share, so MemTotal lands near the limit itself
                total = _mem_total_mib(cri, cid)
                mem_totals.append((memory_gib, total))
                assert abs(total - memory_gib * 1024) <= 128, (memory_gib, total)
                assert _sh(cri, cid, "nproc").strip() == str(cpus)
                # the container's own limit in the guest (CRI containers have no cgroup mount to read it)
                assert _guest_memory_limit(pod_id, cid) == memory_gib * GIB
                assert int(_host_quota(ctd, pod_id)) == sizing.host_cpu_quota_us(cpus)
                if memory_gib == 4:
                    # use 400 MiB, free it: the shrink to 3 GiB gives it back to the host
                    _sh(cri, cid, "dd if=/dev/zero of=/tmp/fill bs=1M count=400 2>/dev/null", timeout=120)
                    filled = qemu.memory_info().rss // MIB
                    _sh(cri, cid, "rm /tmp/fill")
            time.sleep(3)  # free page reporting sends what is left every 2 s
            after = qemu.memory_info().rss // MIB
            assert after < filled - 250, (filled, after)

            # memory alone, as `ctr task update --memory-limit` sends it (Debian's ctr 1.6.20 has no
            # `task update`; both reach the shim's UpdateTask): the CPUs stay
            cri.rt.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
                container_id=cid, linux=api_pb2.LinuxContainerResources(memory_limit_in_bytes=2 * GIB)),
                timeout=cri.timeout)
            assert abs(_mem_total_mib(cri, cid) - 2048) <= 128
            assert _sh(cri, cid, "nproc").strip() == "2"

            # a container joining grows the VM by its limit, leaving shrinks it
            before = _mem_total_mib(cri, cid)
            side = _container(cri, pod_id, pod_config, "side", _resources(512 * MIB, 1))
            assert abs(_mem_total_mib(cri, cid) - (before + 512)) <= 64
            assert _sh(cri, cid, "nproc").strip() == "3"
            cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=side, timeout=1), timeout=cri.timeout)
            cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=side), timeout=cri.timeout)
            assert abs(_mem_total_mib(cri, cid) - before) <= 64
            assert _sh(cri, cid, "nproc").strip() == "2"
            print(f"update latencies (GiB, s): {sizes}; MemTotal (GiB, MiB): {mem_totals}; "
                  f"QEMU RSS filled {filled} MiB -> {after} MiB after the shrink")
        finally:
            cri.stop_pod(pod_id)
            cri.remove_pod(pod_id)
        left = wait_gone(ctd, pod_id)
        assert not left, left
