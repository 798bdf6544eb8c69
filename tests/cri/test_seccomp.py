"""Seccomp profiles of CRI containers in pykata pods: containerd's RuntimeDefault, compiled by the agent
before its VM template was saved (pykata.agent.seccompdefault), and any other profile, compiled for
itself. Each container gets exactly the filter its spec asks for."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2

from pykata.agent import seccompcache
from pykata.agent.seccompdefault import CONTAINERD_1_6_RUNTIME_DEFAULT, CONTAINERD_1_6_RUNTIME_DEFAULT_KEY
from tests.cri.harness import BUSYBOX_IMAGE, KUBELET_NAMESPACES, Cri, CriContainerd, wait_gone

SP = api_pb2.SecurityProfile
# user namespaces need no capability, and containerd's default profile allows unshare only with
# CAP_SYS_ADMIN: what RuntimeDefault denies and a container without a filter may do (CONFIG_USER_NS=y)
UNSHARE = ["sh", "-c", "unshare -U true 2>&1; echo rc=$?"]


def _key(profile: dict[str, object]) -> str | None:
    return seccompcache.profile_key({"linux": {"seccomp": profile}})


def test_the_built_in_profile_has_the_digest_it_is_kept_under() -> None:
    assert _key(CONTAINERD_1_6_RUNTIME_DEFAULT) == CONTAINERD_1_6_RUNTIME_DEFAULT_KEY
    # any change is another profile: an added syscall, another order of one list, another errno
    for change in ("add", "reorder", "errno"):
        other = copy.deepcopy(CONTAINERD_1_6_RUNTIME_DEFAULT)
        names = other["syscalls"][0]["names"]
        if change == "add":
            names.append("unshare")
        elif change == "reorder":
            names[0], names[1] = names[1], names[0]
        else:
            other["syscalls"][-1]["errnoRet"] = 1
        assert _key(other) not in (None, CONTAINERD_1_6_RUNTIME_DEFAULT_KEY), change


def _created_lines(pod_id: str) -> str:
    """The agent's `created container` lines from the pod's guest console."""
    text = "".join(p.read_text(errors="replace")
                   for p in sorted(Path("/run/pykata/sandboxes", pod_id).glob("vm/console.log*")))
    return "\n".join(line for line in text.splitlines() if "created container" in line)


def _container(cri: Cri, pod_id: str, pod_config: object, name: str, profile: api_pb2.SecurityProfile) -> str:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
        command=["sleep", "1000"], linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=KUBELET_NAMESPACES,
                                                                   seccomp=profile)))
    cid = str(cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=cri.timeout).container_id)
    cri.start_container(cid)
    return cid


@pytest.mark.vm
def test_runtime_default_is_loaded_ahead_and_still_denies_another_profile_compiles_its_own(
        cri_containerd: CriContainerd, tmp_path: Path) -> None:
    """The pod's first container (RuntimeDefault) gets the program its template compiled, and its
    filter still denies what the profile denies; a second container whose Localhost profile differs
    by one allowed syscall compiles its own, and gets exactly that filter."""
    allows_unshare = copy.deepcopy(CONTAINERD_1_6_RUNTIME_DEFAULT)
    allows_unshare["syscalls"][0]["names"].append("unshare")
    localhost = tmp_path / "allows-unshare.json"
    localhost.write_text(json.dumps(allows_unshare))
    with Cri(cri_containerd.socket) as cri:
        pod_id, pod_config = cri.run_pod("seccomp", "pykata")
        try:
            first = _container(cri, pod_id, pod_config, "default", SP(profile_type=SP.RuntimeDefault))
            second = _container(cri, pod_id, pod_config, "local",
                                SP(profile_type=SP.Localhost, localhost_ref=str(localhost)))
            lines = _created_lines(pod_id)
            default = re.search(rf"created container {first} .*\(seccomp (\w+) (\w+)\)", lines)
            assert default is not None, lines
            assert default.groups() == ("kept", CONTAINERD_1_6_RUNTIME_DEFAULT_KEY[:12]), lines
            own = re.search(rf"created container {second} .*\(seccomp (\w+) (\w+)\)", lines)
            assert own is not None, lines
            assert own.groups() == ("compiled", _key(allows_unshare)[:12]), lines  # type: ignore[index]

            for cid, expected in ((first, "Operation not permitted"), (second, "rc=0")):
                reply = cri.exec_sync(cid, UNSHARE)
                assert expected in reply.stdout.decode(), (cid, reply.stdout, reply.stderr)
                # the init process is filtered as well
                status = cri.exec_sync(cid, ["grep", "Seccomp:", "/proc/1/status"]).stdout.decode()
                assert re.search(r"Seccomp:\s+2", status), status
        finally:
            cri.stop_pod(pod_id)
            cri.remove_pod(pod_id)
    assert wait_gone(cri_containerd, pod_id) == []
