"""A pod's `linux.cgroupsPath` that would leave the cgroup tree (or make a directory anywhere else on the
host) is refused naming the field, before anything is made (unit level; through containerd in
test_pod_config_attacks.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pykata.config import RuntimeConfig
from pykata.resources import cgroups


@pytest.mark.parametrize("template", [
    "../../../../../../tmp/{m}", "/../../../../tmp/{m}", "/kubepods/../../../../../tmp/{m}", "./{m}",
    "/kubepods/./{m}", "/kubepods/{m}\n", "/kubepods/\x7f{m}", "..:cri:{m}", "../x.slice:cri:{m}",
    "/" + "a/" * 40 + "{m}", "/" + "a" * 2000 + "{m}", "kube--pods.slice:cri:{m}",
])
def test_escaping_paths_are_refused(template: str, tmp_path: Path) -> None:
    marker = f"pwn-{uuid.uuid4().hex[:8]}"
    runtime = RuntimeConfig(sandbox_cgroup_only=True, runtime_dir=str(tmp_path / "run"))
    with pytest.raises(cgroups.CgroupError) as info:
        cgroups.join(runtime, template.format(m=marker), "sb1")
    assert info.value.field == "linux.cgroupsPath"
    assert not list(Path("/tmp").glob(f"*{marker}*")) and not Path(f"/{marker}").exists()
    assert not (tmp_path / "run").exists()  # not even the record of what was made


@pytest.mark.parametrize("value", [7, ["/a"], {"a": 1}])
def test_not_a_string(value: object) -> None:
    with pytest.raises(cgroups.CgroupError) as info:
        cgroups.cgroup_path(value, "sb1", pod_only=True)
    assert info.value.field == "linux.cgroupsPath"
