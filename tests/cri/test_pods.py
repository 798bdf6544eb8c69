"""Kubernetes pods through containerd's CRI plugin, with runc and with pykata (issue 6, no networking)."""

from __future__ import annotations

import pytest

from tests.cri.harness import Cri, CriContainerd
from tests.cri.pod_cycle import pod_cycle


@pytest.mark.vm
@pytest.mark.parametrize("handler", ["runc", "pykata"])
def test_two_container_pod_with_racing_stops(cri_containerd: CriContainerd, handler: str) -> None:
    with Cri(cri_containerd.socket) as cri:
        result = pod_cycle(cri_containerd, cri, handler)
        assert not result.leftovers, f"pod {result.pod_id} left {result.leftovers}"
        assert len(result.stop_errors) <= 1
        assert cri.list_pods() == []
