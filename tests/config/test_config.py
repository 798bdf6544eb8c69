"""configuration.toml parsing, lookup and validation: every bad value names its full key."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from pykata.config import (
    Config,
    load_config,
    load_config_file,
    load_for_annotations,
    packaged_default_text,
    parse_toml,
)
from pykata.errors import ConfigError


def test_packaged_default_parses_and_equals_builtin_defaults() -> None:
    config = parse_toml(packaged_default_text())
    # The shipped file documents every key with its default value.
    assert dataclasses.replace(config, source=None) == Config()
    assert config.qemu.machine_type == "microvm"
    assert config.runtime.runtime_dir == "/run/pykata"
    assert config.runtime.cache_dir == "/var/cache/pykata"


def test_packaged_default_lists_every_key() -> None:
    data = tomllib.loads(packaged_default_text())
    qemu_keys = {f.name for f in dataclasses.fields(Config().qemu)}
    assert set(data["hypervisor"]["qemu"]) == qemu_keys
    assert set(data["agent"]["pykata"]) == {f.name for f in dataclasses.fields(Config().agent.pykata)}
    assert set(data["runtime"]) == {f.name for f in dataclasses.fields(Config().runtime)}
    assert set(data["factory"]) == {f.name for f in dataclasses.fields(Config().factory)}


def test_empty_file_gives_defaults() -> None:
    assert parse_toml("") == Config()


def test_values_are_typed() -> None:
    config = parse_toml(
        """
        [hypervisor.qemu]
        machine_type = "q35"
        default_vcpus = 2
        default_maxvcpus = 4
        default_memory = 512
        shared_fs = "virtio-9p"
        virtio_fs_extra_args = ["--thread-pool-size=1"]
        kvm_probe_timeout = 3
        [agent.pykata]
        kernel_modules = ["e1000e InterruptThrottleRate=3000"]
        [runtime]
        runtime_dir = "/tmp/x"
        """
    )
    assert config.qemu.machine_type == "q35"
    assert config.qemu.default_vcpus == 2
    assert config.qemu.virtio_fs_extra_args == ("--thread-pool-size=1",)
    assert config.qemu.kvm_probe_timeout == 3.0 and isinstance(config.qemu.kvm_probe_timeout, float)
    assert config.agent.pykata.kernel_modules == ("e1000e InterruptThrottleRate=3000",)
    assert config.runtime.runtime_path == Path("/tmp/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.qemu.default_vcpus = 3  # type: ignore[misc]


BAD = [
    ("[hypervisor.qemu]\ntcg_tb_size = -1", "hypervisor.qemu.tcg_tb_size"),
    ("[hypervisor.qemu]\ntcg_tb_size = 5000", "hypervisor.qemu.tcg_tb_size"),
    ("[hypervisor.qemu]\ndefault_memory = -1", "hypervisor.qemu.default_memory"),
    ("[hypervisor.qemu]\ndefault_memory = 10", "hypervisor.qemu.default_memory"),
    ("[hypervisor.qemu]\ndefault_memory = '2G'", "hypervisor.qemu.default_memory"),
    ("[hypervisor.qemu]\ndefault_memory = true", "hypervisor.qemu.default_memory"),
    ("[hypervisor.qemu]\ndefault_memory = 1.5", "hypervisor.qemu.default_memory"),
    ("[hypervisor.qemu]\ndefault_maxmemory = 100\ndefault_memory = 200", "hypervisor.qemu.default_maxmemory"),
    ("[hypervisor.qemu]\ndefault_maxmemory = -5", "hypervisor.qemu.default_maxmemory"),
    ("[hypervisor.qemu]\ndefault_vcpus = 0", "hypervisor.qemu.default_vcpus"),
    ("[hypervisor.qemu]\ndefault_vcpus = 4\ndefault_maxvcpus = 2", "hypervisor.qemu.default_vcpus"),
    ("[hypervisor.qemu]\ndefault_maxvcpus = -1", "hypervisor.qemu.default_maxvcpus"),
    ("[hypervisor.qemu]\ndefault_maxvcpus = 1000", "hypervisor.qemu.default_maxvcpus"),
    ("[hypervisor.qemu]\nmachine_type = 'pc'", "hypervisor.qemu.machine_type"),
    ("[hypervisor.qemu]\nshared_fs = 'nfs'", "hypervisor.qemu.shared_fs"),
    ("[hypervisor.qemu]\naccelerator = 'hvf'", "hypervisor.qemu.accelerator"),
    ("[hypervisor.qemu]\npath = 'qemu'", "hypervisor.qemu.path"),
    ("[hypervisor.qemu]\npath = ''", "hypervisor.qemu.path"),
    ("[hypervisor.qemu]\nkernel = 'vmlinux'", "hypervisor.qemu.kernel"),
    ("[hypervisor.qemu]\ninitrd = '/a'\nimage = '/b'", "hypervisor.qemu.image"),
    ("[hypervisor.qemu]\nvirtio_fs_queue_size = 1000", "hypervisor.qemu.virtio_fs_queue_size"),
    ("[hypervisor.qemu]\nvirtio_fs_extra_args = 'x'", "hypervisor.qemu.virtio_fs_extra_args"),
    ("[hypervisor.qemu]\nvirtio_fs_extra_args = [1]", "hypervisor.qemu.virtio_fs_extra_args"),
    ("[hypervisor.qemu]\nkernel_params = \"a\\nb\"", "hypervisor.qemu.kernel_params"),
    ("[hypervisor.qemu]\nmemory_slots = 1000", "hypervisor.qemu.memory_slots"),
    ("[hypervisor.qemu]\nkvm_probe_timeout = 0", "hypervisor.qemu.kvm_probe_timeout"),
    ("[hypervisor.qemu]\nboot_timeout = -1", "hypervisor.qemu.boot_timeout"),
    ("[hypervisor.qemu]\ncpu_model = 'host; rm -rf'", "hypervisor.qemu.cpu_model"),
    ("[hypervisor.qemu]\nenable_annotations = ['entropy_source']", "hypervisor.qemu.enable_annotations[0]"),
    ("[hypervisor.qemu]\nenable_debug = 'yes'", "hypervisor.qemu.enable_debug"),
    ("[hypervisor.qemu]\nvirtio_9p_cache = 'loose'", "hypervisor.qemu.virtio_9p_cache"),
    ("[hypervisor.qemu]\nbogus_key = 1", "hypervisor.qemu.bogus_key"),
    ("[hypervisor]\nqemu = 1", "hypervisor.qemu"),
    ("[hypervisor.firecracker]\npath = '/x'", "hypervisor.firecracker"),
    ("[agent.kata]\ndebug = true", "agent.kata"),
    ("[agent.pykata]\ndial_timeout = 0", "agent.pykata.dial_timeout"),
    ("[agent.pykata]\nkernel_modules = ['']", "agent.pykata.kernel_modules[0]"),
    ("[agent.pykata]\ntrace = true", "agent.pykata.trace"),
    ("[runtime]\ninternetworking_model = 'bridged'", "runtime.internetworking_model"),
    ("[runtime]\nruntime_dir = 'run'", "runtime.runtime_dir"),
    ("[runtime]\ncache_dir = ''", "runtime.cache_dir"),
    ("[runtime]\nsandbox_cgroup_only = 1", "runtime.sandbox_cgroup_only"),
    ("[factory]\ntemplate_path = 'x'", "factory.template_path"),
    ("[factory]\nenable_template = 'no'", "factory.enable_template"),
    ("[netmon]\nenable = true", "netmon"),
    ("runtime = 'x'", "runtime"),
    ("[runtime]\nrootfs_prewarm = -1", "runtime.rootfs_prewarm"),
    ("[runtime]\nrootfs_prewarm = 200001", "runtime.rootfs_prewarm"),
]


@pytest.mark.parametrize(("text", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_value_names_its_key(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_toml(text)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")


def test_unknown_key_message_lists_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*default_memory"):
        parse_toml("[hypervisor.qemu]\ndefault_mem = 1")


def test_not_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[hypervisor.qemu\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert info.value.field == str(path)
    assert "not valid TOML" in str(info.value)


def test_lookup_order(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[hypervisor.qemu]\ndefault_memory = 256\n")
    config = load_config({"PYKATA_CONFIG": str(path)})
    assert config.qemu.default_memory == 256
    assert config.source == str(path)
    # Without the variable (and no /etc/pykata file on the test machine) the packaged default is used.
    if not Path("/etc/pykata/configuration.toml").exists():
        assert load_config({}).source == "<packaged default>"


def test_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"PYKATA_CONFIG": str(tmp_path / "nope.toml")})
    assert info.value.field == "PYKATA_CONFIG"


def test_config_path_annotation(tmp_path: Path) -> None:
    # the refusals (no allow-list, symlinks, FIFOs, owners, modes, content leaks) are in tests/security
    allowed = tmp_path / "pods"
    allowed.mkdir()
    (allowed / "pod.toml").write_text("[hypervisor.qemu]\ndefault_vcpus = 2\n")
    admin = tmp_path / "admin.toml"
    admin.write_text(f'[runtime]\nvalid_config_paths = ["{allowed}"]\n')
    environ = {"PYKATA_CONFIG": str(admin)}
    config = load_for_annotations({"io.katacontainers.config_path": str(allowed / "pod.toml")}, environ=environ)
    assert config.qemu.default_vcpus == 2
    assert config.source == str(allowed / "pod.toml")
    for bad in ("relative.toml", str(allowed / "none"), str(tmp_path / "admin.toml")):
        with pytest.raises(ConfigError) as info:
            load_for_annotations({"io.katacontainers.config_path": bad}, environ=environ)
        assert info.value.field == "io.katacontainers.config_path"


def test_oversized_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * (1024 * 1024 + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_config_file(path)


def test_resolved_limits() -> None:
    config = parse_toml("[hypervisor.qemu]\ndefault_vcpus = 1\ndefault_memory = 128\n")
    assert config.qemu.resolved_maxvcpus() >= 1
    assert config.qemu.resolved_maxmemory() >= 128
    fixed = parse_toml("[hypervisor.qemu]\ndefault_maxvcpus = 3\ndefault_maxmemory = 4096\n")
    assert fixed.qemu.resolved_maxvcpus() == 3
    assert fixed.qemu.resolved_maxmemory() == 4096


def test_pykata_env_output_round_trips(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pykata.cli.main import cli

    path = tmp_path / "c.toml"
    path.write_text("[hypervisor.qemu]\ndefault_memory = 300\nvirtio_fs_extra_args = ['-o', 'x=\"y\"']\n")
    result = CliRunner().invoke(cli, ["env", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"# source: {path}")
    reparsed = parse_toml(result.output)
    assert dataclasses.replace(reparsed, source=str(path)) == load_config_file(path)
    as_json = CliRunner().invoke(cli, ["env", "--json", "--config", str(path)])
    assert json.loads(as_json.output)["config"]["hypervisor"]["qemu"]["default_memory"] == 300
    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime]\nnope = 1\n")
    failed = CliRunner().invoke(cli, ["env", "--config", str(bad)])
    assert failed.exit_code != 0 and "runtime.nope" in failed.output
