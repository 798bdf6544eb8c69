"""A pod spec that asks for the node's namespaces (hostNetwork, hostPID, hostIPC) or privileged, and
hostPath volumes aimed at pykata's own runtime directory, through containerd's CRI with the pykata
handler. The pod runs, but in the VM's namespaces: no host interface, no host process, no host disk;
pykata's runtime directory and a writable /proc or /sys are refused as hostPaths naming the mount,
and the pod goes on. (Before,
a hostNetwork pod's first container failed: crun refused the node's host name without a UTS
namespace, which the guest now gives it.)"""

from __future__ import annotations

import os

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd, wait_gone

NODE = api_pb2.NamespaceOption(network=api_pb2.NODE, pid=api_pb2.NODE, ipc=api_pb2.NODE)


def _container(name: str, command: list[str], mounts: list[api_pb2.Mount] | None = None) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
        command=command, mounts=mounts or [], linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=NODE, privileged=True)))


@pytest.mark.vm
def test_host_namespaces_privileged_and_hostpaths_at_pykata(cri_containerd: CriContainerd) -> None:
    ctd = cri_containerd
    name = "hostns"
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"),
        hostname=name, linux=api_pb2.LinuxPodSandboxConfig(security_context=api_pb2.LinuxSandboxSecurityContext(
            namespace_options=NODE, privileged=True)))
    with Cri(ctd.socket) as cri:
        pod_id = cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler="pykata"),
                                      timeout=cri.timeout).pod_sandbox_id
        try:
            runtime = next(d for d in ctd.pykata_runtime_dirs if os.path.isdir(os.path.join(d, "sandboxes")))
            # pykata's own files, and the host kernel's knobs (a writable /proc let the guest set sysctls)
            own, kernel = "pykata's own", "an interface of the host's kernel"
            for i, (host_path, why) in enumerate([(runtime, own), (os.path.join(runtime, "sandboxes"), own),
                                                  ("/run/pykata-handoff", own), ("/proc", kernel),
                                                  ("/proc/sys/kernel", kernel), ("/sys/fs/cgroup", kernel)]):
                mount = api_pb2.Mount(container_path="/h", host_path=host_path)
                evil = cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=_container(f"evil{i}", ["sleep", "60"], [mount]),
                    sandbox_config=config), timeout=cri.timeout).container_id
                with pytest.raises(grpc.RpcError) as refused:  # the task (the shim's create) starts here
                    cri.start_container(evil)
                assert "mounts[" in str(refused.value.details()), refused.value.details()
                assert why in str(refused.value.details()), refused.value.details()
                cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=evil), timeout=cri.timeout)
            cid = cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=_container("c", ["sleep", "600"]), sandbox_config=config),
                timeout=cri.timeout).container_id
            cri.start_container(cid)
            # hostNetwork: no interface but loopback (the VM has no NIC: the spec names no namespace to wire)
            links = cri.exec_sync(cid, ["cat", "/proc/net/dev"])
            assert links.exit_code == 0
            names = {line.split(":")[0].strip() for line in links.stdout.decode().splitlines()[2:]}
            assert names == {"lo"}, names
            # hostPID: the VM's processes, not the host's (whose pid 1 is not the guest's, and which
            # runs this test's python)
            procs = cri.exec_sync(cid, ["sh", "-c", "ls /proc | grep -c '^[0-9]'"])
            assert procs.exit_code == 0 and int(procs.stdout) < 100, procs.stdout
            with open("/proc/1/cmdline", "rb") as f:
                host_init = f.read()
            guest_init = cri.exec_sync(cid, ["cat", "/proc/1/cmdline"]).stdout
            assert guest_init != host_init
            # privileged: this harness's containerd does not set privileged_without_host_devices, so the
            # spec lists the host's device nodes; in the guest a node of the same numbers is the VM's
            # device: the container's kernel (the guest's) knows none of the host's disks
            def sizes(text: str) -> dict[str, str]:
                return {f[3]: f[2] for f in (line.split() for line in text.splitlines()[2:]) if len(f) == 4}

            with open("/proc/partitions") as f:
                host_disks = sizes(f.read())
            guest = cri.exec_sync(cid, ["cat", "/proc/partitions"])
            assert guest.exit_code == 0
            guest_disks = sizes(guest.stdout.decode())
            # no block device of the container's is one of the host's (same name and size)
            assert not set(host_disks.items()) & set(guest_disks.items()), (host_disks, guest_disks)
        finally:
            cri.stop_pod(pod_id)
            cri.remove_pod(pod_id)
    left = wait_gone(ctd, pod_id)
    assert not left, f"pod {pod_id} left {left}"
