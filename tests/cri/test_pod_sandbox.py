"""A pod's sandbox container without a pause process in the guest (runtime.sandbox_pause_in_guest = false),
through containerd's CRI, beside runc: what the pod's containers see must be what they see under runc
(shared IPC and host name, /dev/shm, and with pid=POD the pause as pid 1), containerd's view of the
sandbox task must be a running task that dies of StopPodSandbox's SIGKILL with 137, and duplicate
StopPodSandbox calls must neither hang nor leave anything behind."""

from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import BUSYBOX_IMAGE, KUBELET_NAMESPACES, Cri, CriContainerd, wait_gone

pytestmark = pytest.mark.vm
POD = api_pb2.NamespaceOption(pid=api_pb2.POD)
# the pause image's command (tests/cri/harness.py: pykata's built-in `pause`)
PAUSE_CMDLINE = "sleep 2147483647"
VIEW = "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts; hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo"


def _run_pod(cri: Cri, handler: str, ns: api_pb2.NamespaceOption) -> tuple[str, Any]:
    name = f"sbx-{handler}-{uuid.uuid4().hex[:6]}"
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"),
        hostname=name, linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=ns)))
    reply = cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                 timeout=cri.timeout)
    return reply.pod_sandbox_id, config


def _container(cri: Cri, pod_id: str, pod_config: Any, name: str, command: list[str],
               ns: api_pb2.NamespaceOption) -> str:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
        command=command, linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=ns)))
    cid = cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=cri.timeout).container_id
    cri.start_container(cid)
    return str(cid)


def _sh(cri: Cri, cid: str, script: str) -> str:
    reply = cri.exec_sync(cid, ["sh", "-c", script])
    assert reply.exit_code == 0, reply.stderr
    return str(reply.stdout.decode())


def _guest_containers(pod_id: str) -> set[str]:
    """The containers pykata made in the pod's VM (its sandbox's persisted record)."""
    record = json.loads((Path("/run/pykata/sandboxes") / pod_id / "state.json").read_text())
    return set(record["containers"])


def _stop_remove_and_check(ctd: CriContainerd, cri: Cri, pod_id: str) -> None:
    """3 racing StopPodSandbox, 1 more, RemovePodSandbox: none hangs (each call has a deadline), the
    sandbox task died of SIGKILL (137, as containerd logged its exit), and the pod left nothing."""
    with ThreadPoolExecutor(3) as pool:
        for f in [pool.submit(cri.stop_pod, pod_id) for _ in range(3)]:
            try:
                f.result()
            except grpc.RpcError as e:  # containerd 1.6's own races between duplicates are tolerated
                assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"StopPodSandbox hung: {e.details()}"
    cri.stop_pod(pod_id)
    exits = re.findall(rf"TaskExit{{ContainerID:{pod_id},ID:{pod_id},Pid:\d+,ExitStatus:(\d+),", ctd.log.read_text())
    assert exits and set(exits) == {"137"}, exits
    cri.remove_pod(pod_id)
    assert not wait_gone(ctd, pod_id)


@pytest.mark.parametrize("handler", ["runc", "pykata"])
def test_pod_containers_share_ipc_uts_and_shm_as_under_runc(cri_containerd: CriContainerd, handler: str) -> None:
    with Cri(cri_containerd.socket) as cri:
        pod_id, pod_config = _run_pod(cri, handler, KUBELET_NAMESPACES)
        try:
            ids = [_container(cri, pod_id, pod_config, f"c{i}", ["sleep", f"360{i}"], KUBELET_NAMESPACES)
                   for i in range(2)]
            views = [_sh(cri, cid, f"{VIEW}; echo from-{cid[:6]} > /dev/shm/{i}")
                     for i, cid in enumerate(ids)]
            ipc, uts, hostname, pid1 = views[0].splitlines()
            assert views[1].splitlines()[:3] == [ipc, uts, hostname]  # one IPC and one UTS namespace
            assert hostname == pod_config.hostname
            assert (pid1, views[1].splitlines()[3]) == ("sleep 3600 ", "sleep 3601 ")  # pid=CONTAINER: its own
            assert _sh(cri, ids[1], "cat /dev/shm/0") == f"from-{ids[0][:6]}\n"
            if handler == "pykata":
                assert _guest_containers(pod_id) == set(ids)  # no pause in the guest
            # containerd's view of the sandbox task: running, with a pid and statistics
            tasks = cri_containerd.ctr("task", "ls").stdout.decode()
            assert re.search(rf"^{pod_id}\s+[1-9]\d*\s+RUNNING$", tasks, re.M), tasks
            cri_containerd.ctr("task", "metrics", pod_id)
            status = cri.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                             timeout=cri.timeout).status
            assert api_pb2.PodSandboxState.Name(status.state) == "SANDBOX_READY"
        finally:
            _stop_remove_and_check(cri_containerd, cri, pod_id)


@pytest.mark.parametrize("handler", ["runc", "pykata"])
def test_pid_pod_containers_see_the_pause_as_pid_1(cri_containerd: CriContainerd, handler: str) -> None:
    with Cri(cri_containerd.socket) as cri:
        pod_id, pod_config = _run_pod(cri, handler, POD)
        try:
            first = _container(cri, pod_id, pod_config, "c0", ["sleep", "3600"], POD)
            second = _container(cri, pod_id, pod_config, "c1", ["sleep", "3601"], POD)
            ps = _sh(cri, second, f"{VIEW}; ps -o args")
            pid1 = ps.splitlines()[3]
            assert pid1 == f"{PAUSE_CMDLINE} ", ps
            assert "sleep 3600" in ps and "sleep 3601" in ps  # the other container's process too
            assert _sh(cri, first, "cat /proc/1/cmdline | tr '\\0' ' '") == f"{PAUSE_CMDLINE} "
            if handler == "pykata":
                assert _guest_containers(pod_id) == {pod_id, first, second}  # the pause, made when needed
        finally:
            _stop_remove_and_check(cri_containerd, cri, pod_id)
