"""SELinux and AppArmor fields of a spec: the guest kernel has neither LSM, so a label or profile the
user asks for would be dropped silently. Each is refused with an error naming the field (the shim's
path through containerd is tests/shim/test_ctr.py::test_an_apparmor_profile_the_guest_cannot_apply_is_refused;
an exec's process, tests/shim/test_shim_units.py::test_bad_exec_specs_name_the_field)."""

from __future__ import annotations

from typing import Any

import pytest

from pykata.errors import InvalidArgument
from pykata.sandbox.ocispec import build_spec, check_security_labels


@pytest.mark.parametrize(("process", "linux", "field"), [
    ({"selinuxLabel": "system_u:system_r:container_t:s0:c1,c2"}, {}, "process.selinuxLabel"),
    ({"apparmorProfile": "localhost/strict"}, {}, "process.apparmorProfile"),
    ({"apparmorProfile": "runtime/default"}, {}, "process.apparmorProfile"),
    ({}, {"mountLabel": "system_u:object_r:container_file_t:s0:c1,c2"}, "linux.mountLabel"),
])
def test_a_label_the_guest_cannot_apply_is_refused(process: dict[str, Any], linux: dict[str, Any], field: str) -> None:
    spec = build_spec(["true"], env=[])
    spec["process"].update(process)
    spec["linux"].update(linux)
    with pytest.raises(InvalidArgument) as info:
        check_security_labels(spec["process"], spec["linux"])
    assert info.value.field == field
    assert "not enabled in the guest kernel" in str(info.value)


@pytest.mark.parametrize("profile", ["", "unconfined", "cri-containerd.apparmor.d"])
def test_no_profile_and_containerds_unasked_default_pass(profile: str) -> None:
    """containerd's CRI puts cri-containerd.apparmor.d on every container of an AppArmor host unasked;
    the VM is the boundary it stands for (as in Kata), so it is no reason to refuse a pod."""
    spec = build_spec(["true"], env=[])
    spec["process"]["apparmorProfile"] = profile
    check_security_labels(spec["process"], spec["linux"])


def test_a_huge_label_is_cut_in_the_message() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_security_labels({"selinuxLabel": "x" * 100_000})
    assert len(str(info.value)) < 400
