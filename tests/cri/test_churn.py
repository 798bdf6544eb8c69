"""The issue-6 pod-churn loop, a few iterations with pykata: no hang, no leak, every iteration whole."""

from __future__ import annotations

import pytest

from tests.cri.harness import Cri, CriContainerd
from tests.cri.pod_cycle import pod_cycle

ITERATIONS = 10  # one pykata pod cycle takes ~4.5 s with TCG here (bench/churn.py)


@pytest.mark.vm
def test_pykata_pod_churn(cri_containerd: CriContainerd) -> None:
    with Cri(cri_containerd.socket) as cri:
        for i in range(ITERATIONS):
            result = pod_cycle(cri_containerd, cri, "pykata")
            assert not result.leftovers, f"iteration {i}: pod {result.pod_id} left {result.leftovers}"
        assert cri.list_pods() == []
