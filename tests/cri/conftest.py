"""Fixtures of the CRI tests: a private containerd with the CRI plugin (tests/cri/harness.py), the
pause and busybox images imported into its k8s.io namespace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cri.harness import CriContainerd, running_cri_containerd


@pytest.fixture(scope="module")
def cri_containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    with running_cri_containerd(tmp_path_factory.mktemp("cri"), tmp_path_factory.mktemp("cache")) as ctd:
        yield ctd
