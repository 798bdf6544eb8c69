"""Fixtures of the CRI tests: a private containerd with the CRI plugin (tests/cri/harness.py), the
pause and busybox images imported into its k8s.io namespace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cri.harness import CriContainerd, running_cri_containerd


@pytest.fixture(scope="module")
def cri_containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    with running_cri_containerd(tmp_path_factory.mktemp("cri"), tmp_path_factory.mktemp("cache")) as ctd:
        yield ctd


@pytest.fixture(scope="module")
def kubelet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubelet root directory of the module's own (pods/<uid>/volumes/<plugin>/<name> as kubelet lays out)."""
    return tmp_path_factory.mktemp("kubelet")


@pytest.fixture(scope="module")
def kubelet_containerd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                       kubelet_root: Path) -> Iterator[CriContainerd]:
    """A private CRI containerd whose pykata handler knows `kubelet_root` (runtime.kubelet_root_dir), so
    it recognises the module's volumes as kubelet's; a module adds [runtime] keys of its own in
    KUBELET_RUNTIME_CONFIG."""
    extra: dict[str, str] = getattr(request.module, "KUBELET_RUNTIME_CONFIG", {})
    with running_cri_containerd(tmp_path_factory.mktemp("cri"), tmp_path_factory.mktemp("cache"),
                                {"kubelet_root_dir": f'"{kubelet_root}"', **extra}) as ctd:
        yield ctd
