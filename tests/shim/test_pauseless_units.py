"""The pod sandbox without a pause process (pykata.shim.tasks.pauseless): which containers it applies to,
what a signal does to it, and how a CRI container's namespaces reach the guest (pykata.sandbox.ocispec)."""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import pytest

from pykata.config import Config
from pykata.sandbox.ocispec import for_guest
from pykata.shim.stdio import Stdio
from pykata.shim.tasks.pauseless import exit_status, runs_without_guest, shares_pod_pid_namespace

CRI_SANDBOX = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "p1"}
NO_STDIO = Stdio("", "", "", False)


def _spec(annotations: dict[str, str] | None = None, namespaces: list[dict[str, str]] | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"process": {"args": ["/pause"]}, "root": {"path": "rootfs"}, "annotations": annotations or {},
            "linux": {"namespaces": namespaces or []}, **extra}


def test_only_a_quiet_cri_sandbox_container_runs_without_a_guest_process() -> None:
    config = Config()
    assert runs_without_guest(config, _spec(CRI_SANDBOX), NO_STDIO)
    assert runs_without_guest(config, _spec({"io.kubernetes.cri-o.ContainerType": "sandbox"}), NO_STDIO)
    assert not runs_without_guest(config, _spec({"io.kubernetes.cri.container-type": "container"}), NO_STDIO)
    assert not runs_without_guest(config, _spec(), NO_STDIO)  # ctr run: the container is the workload
    assert not runs_without_guest(config, _spec(CRI_SANDBOX), Stdio("", "/run/out.fifo", "", False))
    old = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, sandbox_pause_in_guest=True))
    assert not runs_without_guest(old, _spec(CRI_SANDBOX), NO_STDIO)


@pytest.mark.parametrize(("signum", "status"), [
    (signal.SIGKILL, 137), (signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGHUP, None),
    (signal.SIGUSR1, None), (40, None)])
def test_a_signal_ends_the_absent_pause_as_kubernetes_pause_would(signum: int, status: int | None) -> None:
    assert exit_status(signum) == status


def test_pid_pod_is_told_by_the_path_of_the_pid_namespace() -> None:
    assert shares_pod_pid_namespace(_spec(namespaces=[{"type": "pid", "path": "/proc/42/ns/pid"}]))
    assert not shares_pod_pid_namespace(_spec(namespaces=[{"type": "pid"}]))  # pid=CONTAINER
    assert not shares_pod_pid_namespace(_spec(namespaces=[{"type": "ipc", "path": "/proc/42/ns/ipc"}]))
    assert not shares_pod_pid_namespace({"linux": {"namespaces": "bad"}})


def test_the_pods_ipc_and_uts_namespaces_are_the_vms_in_the_guest() -> None:
    cri = [{"type": "pid"}, {"type": "network", "path": "/proc/42/ns/net"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
           {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"}]
    out, _ = for_guest(_spec(namespaces=cri), "c1")
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]
    # a namespace of its own stays one (ctr run, pykata run), and a host name needs its own UTS namespace
    own = [{"type": "ipc"}, {"type": "uts", "path": "/proc/42/ns/uts"}]
    out, _ = for_guest(_spec(namespaces=own, hostname="named"), "c1")
    assert out["linux"]["namespaces"] == [{"type": "ipc"}, {"type": "uts"}]
