"""The issue-6 pod-churn loop, a few iterations with pykata and kill -9 faults mixed in: no hang, no leak."""

from __future__ import annotations

import pytest

from tests.cri.harness import Cri, CriContainerd
from tests.cri.pod_cycle import fault_for, kill_pod_process, pod_cycle
from tests.shim.harness import SHIM

ITERATIONS = 10  # one pykata pod cycle takes ~4 s with TCG here (bench/churn.py)
FAULT_EVERY = 4  # iterations 3 and 7 kill -9 QEMU, then the shim, between the exec and the stops


@pytest.mark.vm
def test_pykata_pod_churn_with_faults(cri_containerd: CriContainerd) -> None:
    with Cri(cri_containerd.socket) as cri:
        faults = []
        for i in range(ITERATIONS):
            marker = fault_for(i, FAULT_EVERY)
            fault = None if marker is None else (lambda pod_id, m=marker: kill_pod_process(pod_id, m))
            result = pod_cycle(cri_containerd, cri, "pykata", fault=fault)
            assert not result.leftovers, f"iteration {i} ({marker}): pod {result.pod_id} left {result.leftovers}"
            faults.append(marker)
        assert cri.list_pods() == []
        assert sorted(m for m in faults if m) == sorted(["qemu-system", SHIM.name])
