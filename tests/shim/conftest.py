"""Fixtures of the shim tests: a private containerd (tests/shim/harness.py) with a busybox image."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pykata.images import ImageStore
from pykata.images.builtin import export_oci_archive
from tests.shim.harness import IMAGE, Containerd, missing_prerequisites


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
    ctd = Containerd(tmp_path_factory.mktemp("ctd"))
    try:
        ctd.start()
        archive = export_oci_archive(ImageStore(tmp_path_factory.mktemp("cache")).resolve("busybox"),
                                     ctd.dir / "busybox.tar", IMAGE)
        ctd.ctr("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        yield ctd
    finally:
        ctd.stop()
        assert not ctd.shims(), "a shim outlived containerd's teardown"
