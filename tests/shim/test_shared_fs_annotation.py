"""A container started through containerd chooses virtio-fs for its host volumes with the annotation
io.katacontainers.config.hypervisor.shared_fs, where the admin allowed it (`enable_annotations`): its VM
boots cold with virtiofsd, not from the 9p template, and its bind mount is virtio-fs in the guest. A
value pykata does not know stops the container before any VM, naming the annotation."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from pykata.config import SHARED_FS_ANNOTATION, find_config_path, packaged_default_text
from tests.shim.harness import IMAGE, PYKATA_RUNTIME, Containerd, running_with_busybox

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("prerequisites")]


def test_annotation_chooses_virtio_fs_where_allowed(tmp_path_factory: pytest.TempPathFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path_factory.mktemp("sharedfs")
    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    text, n = re.subn(r"(?m)^enable_annotations\s*=.*$", 'enable_annotations = ["shared_fs"]', text)
    assert n == 1, "the configuration has no enable_annotations line"
    (tmp / "pykata.toml").write_text(text)
    monkeypatch.setenv("PYKATA_CONFIG", str(tmp / "pykata.toml"))  # containerd and its shims inherit it
    vol = tmp / "vol"
    vol.mkdir()
    mount = f"type=bind,src={vol},dst=/vol,options=rbind:rw"
    with running_with_busybox(Containerd(tmp / "ctd"), tmp / "cache") as ctd:
        p = ctd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, "--annotation", f"{SHARED_FS_ANNOTATION}=virtio-fs",
                    "--mount", mount, IMAGE, f"vfs-{uuid.uuid4().hex[:8]}",
                    "sh", "-c", "grep ' /vol ' /proc/mounts; echo from-guest > /vol/x", timeout=300)
        assert b" /vol virtiofs " in p.stdout, p.stdout
        assert (vol / "x").read_text() == "from-guest\n"
        bad = ctd.ctr("run", "--rm", "--runtime", PYKATA_RUNTIME, "--annotation", f"{SHARED_FS_ANNOTATION}=nfs",
                      "--mount", mount, IMAGE, f"nfs-{uuid.uuid4().hex[:8]}", "true", check=False)
        assert bad.returncode != 0
        assert SHARED_FS_ANNOTATION.encode() in bad.stderr and b"Traceback" not in bad.stderr, bad.stderr
        assert not ctd.tasks()
    assert sorted(p.name for p in vol.iterdir()) == ["x"]
    Path(vol / "x").unlink()
