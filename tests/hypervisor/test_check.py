"""`pykata check`: each check, the exit code and the JSON output."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pykata.cli.main import cli
from pykata.config import Config, parse_toml
from pykata.hypervisor import check
from pykata.hypervisor.busybox_initrd import write_busybox_initrd
from tests.guest_assets import guest_kernel_path

NAMES = ["config", "cpu-virtualization", "qemu", "kvm", "virtiofsd", "vhost-vsock", "tun", "host-cgroups",
         "vmm-jail", "user-network", "file-guard", "template-memory", "guest-kernel", "guest-image",
         "memory-merging", "containerd",
         "inotify"]  # the last one added by the CLI (cli/check.py: resources is above the hypervisor)


def test_user_network_says_where_the_egress_stack_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata.config import load_config

    def config(stack: str) -> Config:
        c = load_config()
        q = dataclasses.replace(c.qemu, user_network=stack)
        return dataclasses.replace(c, hypervisor=dataclasses.replace(c.hypervisor, qemu=q))

    slirp = check.user_network(config("slirp"))
    assert slirp.status == "pass" and "keeps the host's network namespace" in slirp.detail
    passt = check.user_network(config("passt"))
    assert passt.status == "pass" and passt.facts["passt"] and "empty network namespace" in passt.detail
    monkeypatch.setattr("shutil.which", lambda _name: None)
    missing = check.user_network(config("passt"))
    assert missing.status == "fail" and "not installed" in missing.detail and "passt=" in missing.hint


def test_cpu_flags() -> None:
    assert check.cpu_virtualization("flags\t: fpu vmx sse\n").status == "pass"
    assert check.cpu_virtualization("flags\t: fpu svm\n").detail.endswith("svm")
    result = check.cpu_virtualization("flags\t: fpu sse\n")
    assert result.status == "warn" and "TCG" in result.hint


def test_qemu_version_parse() -> None:
    assert check.parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)") == (7, 2, 22)
    assert check.parse_qemu_version("QEMU emulator version 8.0") == (8, 0, 0)
    assert check.parse_qemu_version("garbage") is None


def test_qemu_missing_fails() -> None:
    config = parse_toml("[hypervisor.qemu]\npath = '/nonexistent/qemu'\n")
    result = check.qemu_binary(config)
    assert result.status == "fail" and "apt-get install" in result.hint


def test_real_qemu_passes() -> None:
    result = check.qemu_binary(Config())
    assert result.status == "pass", result
    assert result.detail.startswith("QEMU 7.") or result.detail.startswith("QEMU ")


def test_virtiofsd_needed_only_for_virtio_fs() -> None:
    missing = "virtio_fs_daemon = '/nonexistent/virtiofsd'\n"
    assert check.virtiofsd(parse_toml("[hypervisor.qemu]\n" + missing)).status == "fail"
    nine_p = parse_toml("[hypervisor.qemu]\nshared_fs = 'virtio-9p'\n" + missing)
    assert check.virtiofsd(nine_p).status == "warn"


def test_cgroups_check_reads_the_hierarchy(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert check.host_cgroups(Config(), tmp_path).status == "pass"
    v1 = tmp_path / "v1"
    (v1 / "unified").mkdir(parents=True)
    (v1 / "unified" / "cgroup.controllers").write_text("")
    result = check.host_cgroups(Config(), v1)
    # only an empty v2: nothing to charge, so pods fail (as Kata's) unless the admin allows it
    assert result.status == "fail" and "hybrid" in result.detail and "allow_uncharged_sandbox" in result.detail
    allowed = parse_toml("[runtime]\nallow_uncharged_sandbox = true\n")
    assert check.host_cgroups(allowed, v1).status == "warn"
    strict = parse_toml("[runtime]\nsandbox_cgroup_only = true\n")
    assert check.host_cgroups(strict, v1).status == "fail"
    (v1 / "memory").mkdir()
    (v1 / "memory" / "cgroup.procs").write_text("")
    result = check.host_cgroups(strict, v1)  # v1 controllers (this host): charged there
    assert result.status == "pass" and "memory" in result.detail and "pod's cgroup" in result.detail
    # a v1 host passes, so the item must not claim v2: its name says what it checks, its detail which
    assert result.name == "host-cgroups" and result.detail.startswith("cgroup v1")
    assert check.host_cgroups(Config(), tmp_path).detail.startswith("unified hierarchy")


def test_missing_guest_assets_fail(tmp_path: Path) -> None:
    config = parse_toml(f"[runtime]\ncache_dir = '{tmp_path}'\n")
    kernel, rootfs, path = check.guest_assets(config)
    assert kernel.status == "fail" and rootfs.status == "fail" and path is None
    assert "pykata image build" in kernel.hint


@pytest.fixture(scope="module")
def runnable_config() -> Iterator[tuple[Path, Path]]:
    """A configuration naming a real kernel and a busybox initrd, with a private cache dir."""
    kernel = guest_kernel_path()
    d = Path(tempfile.mkdtemp(prefix="pkchk"))
    initrd = write_busybox_initrd(d / "initrd.cpio", "#!/bin/sh\necho PYKATA_KVM_PROBE_OK\npoweroff -f\n")
    path = d / "configuration.toml"
    path.write_text(f'[hypervisor.qemu]\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
                    f'[runtime]\ncache_dir = "{d}/cache"\nruntime_dir = "{d}/run"\n'
                    'internetworking_model = "none"\n')
    yield path, d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.vm
def test_cli_json_and_exit_code(runnable_config: tuple[Path, Path]) -> None:
    path, _ = runnable_config
    result = CliRunner().invoke(cli, ["check", "--json", "--config", str(path)])
    data = json.loads(result.output)
    assert [c["name"] for c in data["checks"]] == NAMES
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["config"]["detail"] == str(path)
    assert by_name["guest-kernel"]["status"] == "pass"
    # KVM that cannot boot the guest is a warning, never a failure, with accelerator = "auto".
    assert by_name["kvm"]["status"] in ("pass", "warn")
    assert by_name["kvm"]["detail"]
    assert all(c["status"] in ("pass", "warn", "fail") for c in data["checks"])
    assert data["ok"] == all(c["status"] != "fail" for c in data["checks"])
    assert result.exit_code == (0 if data["ok"] else 1)
    # Every confinement layer is on by default and reported by name.
    assert by_name["vmm-jail"]["status"] == "pass"
    assert by_name["vmm-jail"]["facts"]["layers"] == {
        "seccomp": True, "unprivileged-uid": True, "no-capabilities": True, "no-new-privs": True,
        "chroot": True, "mount-namespace": True, "no-io-uring": True}
    assert by_name["vmm-jail"]["facts"]["landlock_scope"] is True  # the CI hosts' kernel has it (6.12+)


@pytest.mark.vm
def test_cli_human_output(runnable_config: tuple[Path, Path]) -> None:
    path, _ = runnable_config
    result = CliRunner().invoke(cli, ["check", "--config", str(path)])
    for name in NAMES:
        assert name in result.output
    assert ("pykata can run" in result.output) == (result.exit_code == 0)


def test_cli_bad_config_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[hypervisor.qemu]\ndefault_memory = -4\n")
    result = CliRunner().invoke(cli, ["check", "--json", "--config", str(bad)])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert not data["ok"]
    assert data["checks"][0]["status"] == "fail"
    assert "hypervisor.qemu.default_memory" in data["checks"][0]["detail"]
    # the hint says "fix the configuration file named above": the line names it (from --config or
    # PYKATA_CONFIG), once
    assert data["checks"][0]["detail"].startswith(f"{bad}: hypervisor.qemu.default_memory")
    result = CliRunner().invoke(cli, ["check", "--json"], env={"PYKATA_CONFIG": str(bad)})
    assert json.loads(result.output)["checks"][0]["detail"].startswith(f"{bad}: hypervisor.qemu.default_memory")
    missing = tmp_path / "missing.toml"
    result = CliRunner().invoke(cli, ["check", "--json", "--config", str(missing)])
    detail = json.loads(result.output)["checks"][0]["detail"]
    assert detail == f"{missing}: cannot read {missing}: No such file or directory"  # named already: not again


def test_jail_check_names_the_layers_turned_off() -> None:
    config = parse_toml("[hypervisor.qemu]\njail_chroot = false\njail_seccomp = false\n")
    result = check.vmm_jail(config)
    assert result.status == "warn"
    assert "off: seccomp, no-new-privs, chroot" in result.detail
    assert result.facts is not None and result.facts["layers"]["chroot"] is False
    assert check.vmm_jail(Config()).status == "pass"


def test_memory_merging_says_what_the_opt_ins_get_on_this_host() -> None:
    shims = parse_toml("[runtime]\nshim_mem_merge = true\n")
    vms = parse_toml("[hypervisor.qemu]\nmem_merge = true\n")
    off = check.memory_merging(Config(), ksm_running=True, process_merge=True)
    assert off.status == "pass" and off.detail.startswith("off")
    idle = check.memory_merging(shims, ksm_running=False, process_merge=True)
    assert idle.status == "warn" and "ksmd does not run" in idle.detail and "/sys/kernel/mm/ksm/run" in idle.hint
    old_kernel = check.memory_merging(shims, ksm_running=True, process_merge=False)
    assert old_kernel.status == "warn" and "6.7" in old_kernel.detail
    assert check.memory_merging(shims, ksm_running=True, process_merge=True).status == "pass"
    risky = check.memory_merging(vms, ksm_running=True, process_merge=True)
    assert risky.status == "warn" and "side channel" in risky.detail
    assert risky.facts == {"ksmd_running": True, "whole_process": True, "asked": ["hypervisor.qemu.mem_merge"]}
    # this host, as `pykata check` sees it (a marked child tells): Linux 6.7 keeps the mark across exec
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    facts = check.memory_merging(shims, ksm_running=True).facts
    assert facts is not None and facts["whole_process"] is (release >= (6, 7))


def test_an_image_built_without_the_exec_starter_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback (the agent forks its exec children) works but is slower: `pykata check` says so, with the
    build's reason, instead of nothing."""
    from pykata.guestimage import rootfs

    config = parse_toml(f"[runtime]\ncache_dir = '{tmp_path}'\n")
    initrd = tmp_path / "rootfs.cpio"
    initrd.write_bytes(b"")

    def built(why: str | None) -> None:
        manifest = {} if why is None else {"exec_starter": {"built": not why, "why": why}}
        art = rootfs.RootfsArtifact("k", tmp_path, initrd, None, "initrd", manifest)
        monkeypatch.setattr(rootfs, "find_rootfs", lambda cache_dir, recipe=rootfs.DEFAULT_RECIPE: art)

    built("no static C library (libc.a) for /usr/bin/gcc-12: install libc6-dev")
    _kernel, result, _path = check.guest_assets(config)
    assert result.status == "warn" and "no exec starter" in result.detail and "libc6-dev" in result.detail
    assert "build-essential" in result.hint
    for recorded in ("", None):  # built, or an image from before the manifest recorded it
        built(recorded)
        _kernel, result, _path = check.guest_assets(config)
        assert (result.status, result.detail) == ("pass", str(initrd))
