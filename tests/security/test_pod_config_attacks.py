"""Pod authors attack the node through containerd's CRI (tests/cri/harness.py), with the annotations
and cgroup parent of a pod sandbox: a configuration file of their own (`io.katacontainers.config_path`
naming a QEMU that is a shell script), host binaries and arguments by annotation, huge sizes, a cgroup
path out of the cgroup tree. Each pod fails with an error naming the field, and nothing is made: no
shim, VM or runtime directory, no cgroup, no file the attack would have written.

The admin configuration (runtime options ConfigPath) lists the harness's pod-configs directory and
/etc in runtime.valid_config_paths, applies sandbox_cgroup_only, and keeps runtime state in a private
runtime_dir so that "nothing made" is exact. No attack boots a VM.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from cri_api.v1 import api_pb2

from tests.cri.harness import Cri, CriContainerd, running_cri_containerd

H = "io.katacontainers.config.hypervisor."
CONFIG_PATH = "io.katacontainers.config_path"


@pytest.fixture(scope="module")
def ctd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriContainerd]:
    directory = tmp_path_factory.mktemp("cri-attacks")
    with running_cri_containerd(directory, tmp_path_factory.mktemp("cache"), {
            "valid_config_paths": f'["{directory / "pod-configs"}", "/etc"]',
            "runtime_dir": f'"{directory / "run"}"', "sandbox_cgroup_only": "true"}) as ctd:
        yield ctd


@pytest.fixture(scope="module")
def cri(ctd: CriContainerd) -> Iterator[Cri]:
    with Cri(ctd.socket) as cri:
        yield cri


@pytest.fixture
def marker() -> Iterator[Path]:
    """The file the attack's programs would write on the host: it must never appear."""
    path = Path(f"/tmp/owned-{uuid.uuid4().hex[:8]}")
    yield path
    assert not path.exists(), f"the attack ran on the host: {path.read_text()!r}"


def _evil_config(marker: Path, directory: Path, name: str = "evil.toml") -> Path:
    """The probe of issue 11: QEMU is a script of the pod author's, virtiofsd a shell with its command."""
    script = directory / f"{name}.qemu.sh"
    script.write_text(f"#!/bin/sh\nid > {marker}\n")
    script.chmod(0o755)
    path = directory / name
    path.write_text(f'[hypervisor.qemu]\npath = "{script}"\nvirtio_fs_daemon = "/bin/sh"\n'
                    f'virtio_fs_extra_args = ["-c", "id > {marker}"]\n')
    return path


def _pod_fails(ctd: CriContainerd, cri: Cri, annotations: dict[str, str], *, cgroup_parent: str = "") -> str:
    """RunPodSandbox must fail; returns the message once it is clear that nothing of the pod is left."""
    name = f"attack-{uuid.uuid4().hex[:8]}"
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test"),
        hostname=name, annotations=annotations,
        linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler="pykata"),
                             timeout=cri.timeout)
    assert time.monotonic() - start < 30, "refused, but only after a long wait (a blocked shim?)"
    assert not [p for p in cri.list_pods() if p.metadata.name == name]
    run = ctd.dir / "run"
    deadline = time.monotonic() + 20
    while True:
        left = [str(p) for d in (run / "sandboxes", run / "cgroups") if d.is_dir() for p in d.iterdir()]
        left += [f"shim {p.pid}" for p in ctd.shims()]
        left += [f"pid {p.pid}: {' '.join(p.info['cmdline'])[:100]}"
                 for p in psutil.process_iter(["cmdline"])
                 if any(str(run) in a or name in a for a in p.info["cmdline"] or [])]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"left behind: {left}"
    return str(info.value.details())


def test_config_path_outside_the_allow_list(ctd: CriContainerd, cri: Cri, marker: Path, tmp_path: Path) -> None:
    # a file the pod made appear on the node (an emptyDir, an image layer): not in valid_config_paths
    evil = _evil_config(marker, tmp_path)
    for path in (str(evil), f"{ctd.pod_configs}/../../{evil.relative_to('/')}", "/proc/self/environ"):
        message = _pod_fails(ctd, cri, {CONFIG_PATH: path})
        assert f"{CONFIG_PATH}: " in message and "valid_config_paths" in message, message


def test_config_path_symlink_fifo_mode_owner(ctd: CriContainerd, cri: Cri, marker: Path, tmp_path: Path) -> None:
    allowed = ctd.pod_configs
    evil = _evil_config(marker, tmp_path)
    made: list[Path] = []
    try:
        link = allowed / f"link-{marker.name}.toml"
        link.symlink_to(evil)
        made.append(link)
        fifo = allowed / f"fifo-{marker.name}.toml"
        os.mkfifo(fifo)
        made.append(fifo)
        writable = _evil_config(marker, allowed, f"ww-{marker.name}.toml")
        writable.chmod(0o666)
        made += [writable, allowed / f"{writable.name}.qemu.sh"]
        users = _evil_config(marker, allowed, f"user-{marker.name}.toml")
        os.chown(users, 65534, 65534)
        made += [users, allowed / f"{users.name}.qemu.sh"]
        for path, why in ((link, "symlink"), (fifo, "not a regular file"),
                          (writable, "writable by group or others"), (users, "not owned by root")):
            message = _pod_fails(ctd, cri, {CONFIG_PATH: str(path)})
            assert f"{CONFIG_PATH}: " in message and why in message, message
    finally:
        for p in made:
            p.unlink()


def test_config_path_parse_error_shows_nothing_of_the_file(ctd: CriContainerd, cri: Cri) -> None:
    # /etc is allowed here (an admin's mistake): /etc/shadow passes the owner and mode checks, and its
    # parse error must not carry any of its text back to the pod author
    message = _pod_fails(ctd, cri, {CONFIG_PATH: "/etc/shadow"})
    assert f"{CONFIG_PATH}: " in message and "not a valid pykata configuration" in message, message
    shadow = Path("/etc/shadow").read_text()
    tokens = {t for line in shadow.splitlines() for t in line.split(":") if len(t) >= 4}
    assert not [t for t in tokens if t in message.replace("/etc/shadow", "")]
    assert "line " not in message and "column" not in message


def test_host_binaries_and_arguments_by_annotation(ctd: CriContainerd, cri: Cri, marker: Path) -> None:
    # even from a configuration that enables them: that file itself is refused
    enabling = ctd.pod_configs / f"enable-{marker.name}.toml"
    enabling.write_text('[hypervisor.qemu]\nenable_annotations = ["virtio_fs_extra_args", "path"]\n')
    try:
        message = _pod_fails(ctd, cri, {CONFIG_PATH: str(enabling)})
        assert "bad hypervisor.qemu.enable_annotations[0]" in message, message
    finally:
        enabling.unlink()
    for key, value in (("virtio_fs_extra_args", '["-o", "source=/"]'), ("path", f"/bin/sh -c 'id > {marker}'"),
                       ("virtio_fs_daemon", "/bin/sh"), ("kernel", "/etc/shadow"), ("initrd", "/etc/shadow")):
        message = _pod_fails(ctd, cri, {H + key: value})
        assert f"{H}{key}: " in message and "never" in message, message


def test_huge_numbers_by_annotation(ctd: CriContainerd, cri: Cri) -> None:
    allowing = ctd.pod_configs / f"sizes-{uuid.uuid4().hex[:8]}.toml"
    allowing.write_text('[hypervisor.qemu]\nenable_annotations = ["default_memory", "default_vcpus", '
                        '"default_maxvcpus", "memory_slots", "virtio_fs_queue_size"]\n')
    cases: list[tuple[str, str]] = [
        ("default_memory", str(1 << 40)), ("default_memory", "9" * 5000), ("default_vcpus", "100000"),
        ("default_maxvcpus", "-1"), ("memory_slots", "1e9"), ("virtio_fs_queue_size", "65536"),
    ]
    try:
        for key, value in cases:
            message = _pod_fails(ctd, cri, {CONFIG_PATH: str(allowing), H + key: value})
            assert f"{H}{key}" in message, message
    finally:
        allowing.unlink()


def test_cgroup_parent_out_of_the_tree(ctd: CriContainerd, cri: Cri, marker: Path) -> None:
    # containerd makes the sandbox's cgroupsPath <cgroup_parent>/<pod id> and keeps a leading "..":
    # with sandbox_cgroup_only the shim would make that directory in every hierarchy
    # (an absolute parent with ".." is cleaned by containerd, and stays in the tree)
    message = _pod_fails(ctd, cri, {}, cgroup_parent=f"../../../../../../../..{marker}")
    assert "linux.cgroupsPath: " in message and "leave the cgroup tree" in message, message
