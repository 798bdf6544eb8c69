"""Faults in the pod-churn loop (issue 6): QEMU or the shim killed with SIGKILL between the exec and the
StopPodSandbox calls; the pod must still stop and be removed with nothing left."""

from __future__ import annotations

import pytest

from tests.cri.harness import Cri, CriContainerd
from tests.cri.pod_cycle import kill_pod_process, pod_cycle
from tests.shim.harness import SHIM


@pytest.mark.vm
@pytest.mark.parametrize("marker", ["qemu-system", SHIM.name])
def test_pod_removed_after_kill9(cri_containerd: CriContainerd, marker: str) -> None:
    with Cri(cri_containerd.socket) as cri:
        result = pod_cycle(cri_containerd, cri, "pykata", fault=lambda pod_id: kill_pod_process(pod_id, marker))
        assert not result.leftovers, f"pod {result.pod_id} left {result.leftovers}"
        assert cri.list_pods() == []
