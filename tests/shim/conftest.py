"""Fixtures of the shim tests: a private containerd (tests/shim/harness.py) with a busybox image."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.shim.harness import Containerd, missing_prerequisites, running_with_busybox


@pytest.fixture
def prerequisites() -> None:
    # scripts/install.sh installs all of these: their absence is a broken setup, not a reason to skip
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the shim tests need {missing}")


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the shim tests need {missing}")
    with running_with_busybox(Containerd(tmp_path_factory.mktemp("ctd")),
                              tmp_path_factory.mktemp("cache")) as ctd:
        yield ctd
