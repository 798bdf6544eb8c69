"""Annotation overrides: allowed only through enable_annotations, never for host binaries/paths/args."""

from __future__ import annotations

import dataclasses

import pytest

from pykata.config import Config, apply_annotations, parse_toml
from pykata.config.schema import ANNOTATABLE_HYPERVISOR_KEYS, NEVER_ANNOTATABLE_HYPERVISOR_KEYS, RuntimeConfig
from pykata.errors import ConfigError

H = "io.katacontainers.config.hypervisor."


def _config(enable: list[str], **extra: str) -> Config:
    lines = [f"enable_annotations = {enable!r}".replace("'", '"')]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return parse_toml("[hypervisor.qemu]\n" + "\n".join(lines) + "\n")


def test_unrelated_annotations_are_ignored() -> None:
    config = Config()
    assert apply_annotations(config, {"io.kubernetes.cri.sandbox-id": "x", "foo": "bar"}) is config


def test_allowed_overrides_apply() -> None:
    config = _config(["default_vcpus", "default_memory", "kernel_params"],
                     kernel_params='"quiet"', default_maxvcpus="4")
    new = apply_annotations(config, {
        H + "default_vcpus": "2",
        H + "default_memory": "512",
        H + "kernel_params": "debug",
    })
    assert new.qemu.default_vcpus == 2
    assert new.qemu.default_memory == 512
    assert new.qemu.kernel_params == "quiet debug"
    assert config.qemu.default_vcpus == 1  # the original is untouched


def test_not_allow_listed_is_rejected_naming_the_annotation() -> None:
    with pytest.raises(ConfigError) as info:
        apply_annotations(_config(["default_memory"]), {H + "default_vcpus": "2"})
    assert info.value.field == H + "default_vcpus"
    assert "enable_annotations" in str(info.value)


def test_unknown_annotation_rejected() -> None:
    for name in (H + "entropy_source", H + "nonsense", "io.katacontainers.config.runtime.x",
                 "io.katacontainers.config.agent.nope"):
        with pytest.raises(ConfigError) as info:
            apply_annotations(_config(["default_memory"]), {name: "1"})
        assert info.value.field == name


@pytest.mark.parametrize(("key", "value"), [
    ("default_vcpus", "two"), ("default_vcpus", "0"), ("default_memory", "-1"), ("default_memory", "1.5"),
    ("machine_type", "pc"), ("shared_fs", "nfs"), ("enable_debug", "maybe"),
    ("kernel_params", "a\nb"), ("default_memory", str(1 << 40)), ("default_vcpus", "256"),
])
def test_bad_annotation_values_name_the_annotation(key: str, value: str) -> None:
    config = _config([key])
    with pytest.raises(ConfigError) as info:
        apply_annotations(config, {H + key: value})
    assert info.value.field == H + key


def test_vcpus_above_max_names_annotation() -> None:
    config = _config(["default_vcpus"], default_maxvcpus="2")
    with pytest.raises(ConfigError) as info:
        apply_annotations(config, {H + "default_vcpus": "3"})
    assert info.value.field == H + "default_vcpus"


@pytest.mark.parametrize("key", ["path", "virtio_fs_daemon", "virtio_fs_extra_args", "kernel", "initrd",
                                 "image", "entropy_source"])
def test_host_choosing_keys_are_never_annotatable(key: str) -> None:
    # not even when the admin lists them: the configuration itself is refused
    with pytest.raises(ConfigError) as info:
        _config([key])
    assert info.value.field == "hypervisor.qemu.enable_annotations[0]" and "never" in str(info.value)
    with pytest.raises(ConfigError) as info:
        apply_annotations(_config(["default_memory"]), {H + key: "/bin/sh"})
    assert info.value.field == H + key and "never" in str(info.value)


def test_agent_annotations() -> None:
    new = apply_annotations(Config(), {
        "io.katacontainers.config.agent.debug": "true",
        "io.katacontainers.config.agent.kernel_modules": '["virtio_net"]',
    })
    assert new.agent.pykata.debug is True
    assert new.agent.pykata.kernel_modules == ("virtio_net",)
    with pytest.raises(ConfigError) as info:
        apply_annotations(Config(), {"io.katacontainers.config.agent.dial_timeout": "0"})
    assert info.value.field == "io.katacontainers.config.agent.dial_timeout"


def test_oversized_value_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        apply_annotations(_config(["kernel_params"]), {H + "kernel_params": "x" * 5000})
    assert info.value.field == H + "kernel_params"


@pytest.mark.parametrize("key", NEVER_ANNOTATABLE_HYPERVISOR_KEYS)
def test_every_confinement_and_host_key_is_refused_even_when_listed(key: str) -> None:
    """Each key that chooses a host binary, file or argument, or loosens QEMU's confinement (the
    jail_* layers, mem_merge: KSM across pods is a side channel), refused both in the admin's
    allow-list and from a pod that is not allowed it."""
    with pytest.raises(ConfigError, match="never"):
        _config([key])
    with pytest.raises(ConfigError) as info:
        apply_annotations(_config(["default_memory"]), {H + key: "false" if key.startswith(("jail", "mem")) else "x"})
    assert info.value.field == H + key and "never" in str(info.value)


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(RuntimeConfig)])
def test_no_runtime_key_is_settable_by_a_pod(key: str) -> None:
    """The [runtime] knobs (shim_mem_merge, rootfs_prewarm, watchable bounds, the cgroup and
    kubelet paths, ...) are the admin's: a pod's `io.katacontainers.config.runtime.<key>` fails
    naming it, whatever the allow-list holds."""
    name = f"io.katacontainers.config.runtime.{key}"
    config = _config(list(ANNOTATABLE_HYPERVISOR_KEYS))
    with pytest.raises(ConfigError) as info:
        apply_annotations(config, {name: "1"})
    assert info.value.field == name
