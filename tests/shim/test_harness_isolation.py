"""The test containerds share this host (other engineers', a CI run's) and, for CRI, one containerd
namespace (k8s.io), so one runc root: a harness's teardown must kill its own runc containers only.
(One that ran `runc delete -f` on every container there SIGKILLed a node installer another test's
containerd was running: `ctr run` exited 137 with no stderr.)"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest

from tests.shim.harness import IMAGE, RUNC_ROOT, Containerd, missing_prerequisites, running_with_busybox


def test_a_harness_teardown_leaves_another_containerds_containers_in_the_same_namespace(
        tmp_path: Path) -> None:
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"the shim tests need {missing}")
    shared = f"pykata-test-shared-{uuid.uuid4().hex[:8]}"  # as k8s.io is to the CRI tests' containerds
    with running_with_busybox(Containerd(tmp_path / "a", namespace=shared), tmp_path / "cache") as a, \
            running_with_busybox(Containerd(tmp_path / "b", namespace=shared), tmp_path / "cache") as b:
        a.ctr("run", "-d", IMAGE, "a-1", "sleep", "1000")
        b.ctr("run", "-d", IMAGE, "b-1", "sleep", "1000")
        assert {"a-1", "b-1"} <= {p.name for p in (RUNC_ROOT / shared).iterdir()}
        b.force_cleanup()  # what b's teardown runs after containerd is gone
        assert a.tasks() == {"a-1": "RUNNING"}  # another containerd's container: untouched
        assert not (RUNC_ROOT / shared / "b-1").exists()  # its own: gone
    with contextlib.suppress(OSError):
        (RUNC_ROOT / shared).rmdir()
