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
        # pod_cycle already refused any error that is not one of containerd 1.6's own stop races; both
        # duplicates may hit one (seen 3 in ~33 runs once the shim's delete got faster), the winner may not
        assert len(result.stop_errors) <= 2, result.stop_errors
        assert cri.list_pods() == []
