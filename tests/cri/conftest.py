"""Fixtures of the CRI tests: a private containerd with the CRI plugin (tests/cri/harness.py), the
pause and busybox images imported into its k8s.io namespace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cri.harness import CriContainerd, missing_cri_prerequisites


@pytest.fixture(scope="module")
def cri_containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    # scripts/install.sh installs all of these: their absence is a broken setup, not a reason to skip
    missing = missing_cri_prerequisites()
    if missing:
        pytest.fail(f"the CRI tests need {missing}")
    ctd = CriContainerd(tmp_path_factory.mktemp("cri"))
    try:
        ctd.start()
        ctd.import_images(tmp_path_factory.mktemp("cache"))
        yield ctd
    finally:
        ctd.stop()
        assert not ctd.shims(), "a shim outlived containerd's teardown"
