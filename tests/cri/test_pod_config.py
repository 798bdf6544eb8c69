"""Pod configuration through containerd's CRI (issue 6): `io.katacontainers.config.*` overrides (allowed
ones apply, others fail RunPodSandbox naming the annotation, nothing left), VM sizing from the sandbox
annotations containerd derives from PodSandboxConfig.linux.resources, and what the CRI hands every
container (hostname, /etc/hosts, /etc/resolv.conf, the pod's /dev/shm, hostPath volumes and single-file
mounts), with runc beside pykata where the two must agree.

The fast tests at the top check the same rules without a VM.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2

from pykata.agent import bundle
from pykata.config import (
    SHARED_FS_ANNOTATION,
    find_config_path,
    load_for_annotations,
    packaged_default_text,
    parse_toml,
)
from pykata.errors import ConfigError, InvalidArgument
from pykata.resources import sizing
from pykata.sandbox.ocispec import POD_SHM_SOURCE, for_guest
from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd, admin_config, wait_gone

H = "io.katacontainers.config.hypervisor."
MIB = 1 << 20


# -- without a VM --------------------------------------------------------------------------------

def _spec(annotations: dict[str, str] | None = None, resources: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"annotations": annotations or {}, "linux": {"resources": resources or {}}}


def test_size_from_sandbox_annotations() -> None:
    size = sizing.pod_size(_spec({sizing.SANDBOX_CPU_QUOTA: "250000", sizing.SANDBOX_CPU_PERIOD: "100000",
                                  sizing.SANDBOX_CPU_SHARES: "1024", sizing.SANDBOX_MEMORY: str(1024 * MIB)}))
    assert (size.vcpus, size.memory_mib) == (3, 1024 + sizing.VM_MEMORY_OVERHEAD_MIB)
    # unset (containerd writes 0) and unlimited (-1) leave the defaults
    size = sizing.pod_size(_spec({sizing.SANDBOX_CPU_QUOTA: "-1", sizing.SANDBOX_CPU_PERIOD: "0",
                                  sizing.SANDBOX_MEMORY: "0"}))
    assert (size.vcpus, size.memory_mib) == (None, None)


def test_size_takes_the_larger_of_annotations_and_limits() -> None:
    size = sizing.pod_size(_spec({sizing.SANDBOX_MEMORY: str(512 * MIB)},
                                 {"memory": {"limit": 1024 * MIB}, "cpu": {"quota": 150000, "period": 100000}}))
    assert (size.vcpus, size.memory_mib) == (2, 1024 + sizing.VM_MEMORY_OVERHEAD_MIB)
    assert size.memory_source == "linux.resources.memory.limit"


@pytest.mark.parametrize(("annotations", "resources", "field"), [
    ({sizing.SANDBOX_MEMORY: "lots"}, None, sizing.SANDBOX_MEMORY),
    ({sizing.SANDBOX_MEMORY: "-5"}, None, sizing.SANDBOX_MEMORY),
    ({sizing.SANDBOX_MEMORY: "1" * 40}, None, sizing.SANDBOX_MEMORY),
    ({sizing.SANDBOX_CPU_QUOTA: "1.5"}, None, sizing.SANDBOX_CPU_QUOTA),
    ({sizing.SANDBOX_CPU_QUOTA: "-7"}, None, sizing.SANDBOX_CPU_QUOTA),
    ({sizing.SANDBOX_CPU_QUOTA: "100000", sizing.SANDBOX_CPU_PERIOD: "10"}, None, sizing.SANDBOX_CPU_PERIOD),
    ({sizing.SANDBOX_CPU_PERIOD: "-100000"}, None, sizing.SANDBOX_CPU_PERIOD),
    ({sizing.SANDBOX_CPU_SHARES: "999999"}, None, sizing.SANDBOX_CPU_SHARES),
    ({sizing.SANDBOX_CPU_SHARES: ""}, None, sizing.SANDBOX_CPU_SHARES),
    (None, {"memory": {"limit": "1g"}}, "linux.resources.memory.limit"),
    (None, {"cpu": {"quota": True}}, "linux.resources.cpu.quota"),
    (None, {"cpu": []}, "linux.resources.cpu"),
])
def test_bad_size_values_name_the_field(annotations: dict[str, str] | None, resources: dict[str, Any] | None,
                                        field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        sizing.pod_size(_spec(annotations, resources))
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")


def test_a_bigger_vm_boots_cold_and_vcpus_are_capped() -> None:
    config = parse_toml("[hypervisor.qemu]\ndefault_memory = 512\ndefault_maxvcpus = 2\n")
    same, vcpus, memory = sizing.fit(config, sizing.PodSize(1, 300))
    assert same is config and (vcpus, memory) == (1, 300)  # fits the template's size: cloned
    bigger, vcpus, memory = sizing.fit(config, sizing.PodSize(8, 768, "q", "m"))
    assert (vcpus, memory) == (2, 768)
    assert not bigger.factory.enable_template and config.factory.enable_template
    with pytest.raises(InvalidArgument) as info:
        sizing.fit(config, sizing.PodSize(None, 1 << 40, "", sizing.SANDBOX_MEMORY))
    assert info.value.field == sizing.SANDBOX_MEMORY and "the host's memory" in str(info.value)
    # up to the balloon's ceiling a microvm is sized after boot: a template of the default size carries it
    elastic = parse_toml("[hypervisor.qemu]\ndefault_memory = 512\ndefault_maxmemory = 1024\ndefault_maxvcpus = 2\n")
    same, vcpus, memory = sizing.fit(elastic, sizing.PodSize(2, 1000, "q", "m"))
    assert same is elastic and (vcpus, memory) == (2, 1000)
    bigger, _, _ = sizing.fit(elastic, sizing.PodSize(None, 1100, "q", "m"))
    assert not bigger.factory.enable_template


def _config_file(tmp: Path, enable: list[str]) -> Path:
    """The configuration the tests run with ($PYKATA_CONFIG, /etc/pykata or packaged), allowing `enable`,
    in `tmp` (a directory the admin configuration lists in runtime.valid_config_paths)."""
    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    line = "enable_annotations = [" + ", ".join(f'"{k}"' for k in enable) + "]"
    text, n = re.subn(r"(?m)^enable_annotations\s*=.*$", line, text)
    if n == 0:
        text = text.replace("[hypervisor.qemu]\n", f"[hypervisor.qemu]\n{line}\n", 1)
    path = tmp / f"configuration-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    assert parse_toml(text).qemu.enable_annotations == tuple(enable)
    return path


def test_load_for_annotations_applies_overrides_and_skips_the_template(tmp_path: Path) -> None:
    path = str(_config_file(tmp_path, ["kernel_params", "default_memory"]))
    environ = {"PYKATA_CONFIG": str(admin_config(tmp_path / "admin.toml", valid_config_paths=f'["{tmp_path}"]'))}
    base = load_for_annotations({"io.katacontainers.config_path": path}, environ)
    assert base.factory.enable_template  # no override: the template is used
    config = load_for_annotations({"io.katacontainers.config_path": path, H + "default_memory": "1536",
                                   H + "kernel_params": "pykata.x=1", "io.kubernetes.cri.sandbox-id": "x"},
                                  environ)
    assert config.qemu.default_memory == 1536
    assert config.qemu.kernel_params.endswith("pykata.x=1")
    assert not config.factory.enable_template
    with pytest.raises(ConfigError) as info:
        load_for_annotations({"io.katacontainers.config_path": path, H + "default_vcpus": "2"}, environ)
    assert info.value.field == H + "default_vcpus"


def test_a_pod_choosing_virtio_fs_boots_cold(tmp_path: Path) -> None:
    """virtio-fs is the configured default, which templated VMs replace with 9p: a pod that names it
    (allowed by the admin) gets a cold-booted VM with virtio-fs; naming 9p keeps the template; an
    unknown value, or the annotation where the admin did not allow it, is refused naming it."""
    name = SHARED_FS_ANNOTATION
    allowed = {"PYKATA_CONFIG": str(_config_file(tmp_path, ["shared_fs"]))}
    assert load_for_annotations({}, allowed).factory.enable_template
    config = load_for_annotations({name: "virtio-fs"}, allowed)
    assert config.qemu.shared_fs == "virtio-fs" and not config.factory.enable_template
    config = load_for_annotations({name: "virtio-9p"}, allowed)
    assert config.qemu.shared_fs == "virtio-9p" and config.factory.enable_template
    for environ, value, why in ((allowed, "nfs", "must be one of"),
                                ({"PYKATA_CONFIG": str(_config_file(tmp_path, []))}, "virtio-fs",
                                 "enable_annotations")):
        with pytest.raises(ConfigError) as info:
            load_for_annotations({name: value}, environ)
        assert info.value.field == name and why in str(info.value), info.value


def test_pod_shm_becomes_the_vms_shm(tmp_path: Path) -> None:
    host_shm = {"destination": "/dev/shm", "type": "bind", "source": "/var/lib/cri/sandboxes/x/shm",
                "options": ["rbind", "rprivate", "rw"]}
    hosts = {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/cri/sandboxes/x/hosts",
             "options": ["rbind", "rprivate", "rw"]}
    spec = {"process": {"args": ["true"]}, "root": {"path": "rootfs"}, "mounts": [host_shm, hosts]}
    guest, shares = for_guest(spec, "c1")
    assert [v.guest for v in shares] == ["/etc/hosts"]  # the shm is not shared from the host
    shm = guest["mounts"][0]
    assert (shm["type"], shm["source"]) == ("tmpfs", POD_SHM_SOURCE)
    (tmp_path / "shm").mkdir()
    mounts = bundle.check_mounts([shm], [tmp_path / "shared"], pod_shm=tmp_path / "shm")
    assert mounts == [{"destination": "/dev/shm", "type": "bind", "source": str(tmp_path / "shm"),
                       "options": ["rbind", "nosuid", "nodev", "noexec"]}]


# -- through CRI -----------------------------------------------------------------------------------

def _pod_config(name: str, *, annotations: dict[str, str] | None = None, dns: Any = None,
                resources: Any = None) -> Any:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test", attempt=0),
        hostname=name, annotations=annotations or {}, dns_config=dns,
        linux=api_pb2.LinuxPodSandboxConfig(resources=resources))


@contextlib.contextmanager
def _pod(ctd: CriContainerd, cri: Cri, handler: str, config: Any) -> Iterator[str]:
    """A running pod, stopped and removed afterwards; the test fails if any of it is left."""
    reply = cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                 timeout=cri.timeout)
    pod_id = str(reply.pod_sandbox_id)
    try:
        yield pod_id
    finally:
        try:
            cri.stop_pod(pod_id)
        finally:
            cri.remove_pod(pod_id)
    left = wait_gone(ctd, pod_id)
    assert not left, f"pod {pod_id} left {left}"


def _container(cri: Cri, pod_id: str, pod_config: Any, name: str, *, mounts: list[Any] | None = None,
               resources: Any = None) -> str:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE),
        command=["sleep", "3600"], mounts=mounts or [], linux=api_pb2.LinuxContainerConfig(resources=resources))
    reply = cri.rt.CreateContainer(api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=cri.timeout)
    cid = str(reply.container_id)
    cri.start_container(cid)
    return cid


def _sh(cri: Cri, cid: str, script: str, *, ok: bool = True) -> str:
    reply = cri.exec_sync(cid, ["sh", "-c", script])
    if ok:
        assert reply.exit_code == 0, f"{script!r} exited {reply.exit_code}: {reply.stderr!r}"
        return str(reply.stdout.decode())
    assert reply.exit_code != 0, f"{script!r} succeeded: {reply.stdout!r}"
    return str(reply.stderr.decode())


def _run_pod_fails(ctd: CriContainerd, cri: Cri, config: Any) -> str:
    """RunPodSandbox of `config` with pykata must fail; returns its message once nothing of the pod
    (shims, VMs, mounts, CRI and pykata directories) is left."""
    with pytest.raises(grpc.RpcError) as info:
        cri.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler="pykata"),
                             timeout=cri.timeout)
    assert info.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED
    assert not [p for p in cri.list_pods() if p.metadata.name == config.metadata.name]
    # containerd has no id to give for a pod it failed to run: every pod directory containerd made
    # (it names them by pod id) must be gone, and with them anything else named by those ids
    sandboxes = [ctd.state / "io.containerd.grpc.v1.cri" / "sandboxes",
                 ctd.dir / "root" / "io.containerd.grpc.v1.cri" / "sandboxes"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = [str(p) for d in sandboxes if d.is_dir() for p in d.iterdir()] + [str(p.pid) for p in ctd.shims()]
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"left behind: {left}"
    return str(info.value.details())


@pytest.mark.vm
def test_allowed_overrides_take_effect(cri_containerd: CriContainerd) -> None:
    path = _config_file(cri_containerd.pod_configs, ["kernel_params", "default_memory"])
    marker = f"pykata.annotation_test={uuid.uuid4().hex[:8]}"
    annotations = {"io.katacontainers.config_path": str(path), H + "kernel_params": marker,
                   H + "default_memory": "1536"}
    config = _pod_config(f"override-{uuid.uuid4().hex[:6]}", annotations=annotations)
    with Cri(cri_containerd.socket) as cri, _pod(cri_containerd, cri, "pykata", config) as pod_id:
        cid = _container(cri, pod_id, config, "c0")
        assert marker in _sh(cri, cid, "cat /proc/cmdline").split()
        total_mib = _meminfo_total_mib(_sh(cri, cid, "cat /proc/meminfo"))
        assert 1536 - 200 < total_mib <= 1536, total_mib  # the default is 2048


@pytest.mark.vm
def test_disallowed_or_unknown_annotations_fail_the_pod(cri_containerd: CriContainerd) -> None:
    path = str(_config_file(cri_containerd.pod_configs, ["default_memory", "kernel_params"]))
    cases = [
        ({H + "default_vcpus": "2"}, H + "default_vcpus", "enable_annotations"),
        ({H + "nonsense": "1"}, H + "nonsense", "unknown"),
        ({"io.katacontainers.config_path": path, H + "path": "/bin/sh"}, H + "path", "never"),
        ({"io.katacontainers.config_path": path, H + "kernel_params": "a\nb"}, H + "kernel_params", ""),
    ]
    with Cri(cri_containerd.socket) as cri:
        for annotations, name, why in cases:
            config = _pod_config(f"rejected-{uuid.uuid4().hex[:6]}", annotations=annotations)
            message = _run_pod_fails(cri_containerd, cri, config)
            assert f"{name}: " in message and why in message, message


def _meminfo_total_mib(text: str) -> int:
    m = re.search(r"^MemTotal:\s+(\d+) kB$", text, re.M)
    assert m, text
    return int(m.group(1)) // 1024


@pytest.mark.vm
def test_pod_resources_size_the_vm(cri_containerd: CriContainerd) -> None:
    # kubelet sends the sum of the containers' limits; containerd turns it into the sandbox annotations
    resources = api_pb2.LinuxContainerResources(cpu_period=100_000, cpu_quota=200_000, cpu_shares=2048,
                                                memory_limit_in_bytes=2048 * MIB)
    config = _pod_config(f"sized-{uuid.uuid4().hex[:6]}", resources=resources)
    with Cri(cri_containerd.socket) as cri, _pod(cri_containerd, cri, "pykata", config) as pod_id:
        cid = _container(cri, pod_id, config, "c0", resources=api_pb2.LinuxContainerResources(
            cpu_period=100_000, cpu_quota=200_000, memory_limit_in_bytes=2048 * MIB))
        assert _sh(cri, cid, "nproc").strip() == "2"
        total_mib = _meminfo_total_mib(_sh(cri, cid, "cat /proc/meminfo"))
        # 2048 MiB asked + 256 MiB for the guest itself; the configured default is 2048 MiB
        assert 2048 < total_mib <= 2048 + sizing.VM_MEMORY_OVERHEAD_MIB, total_mib


@pytest.mark.vm
def test_bad_pod_resources_fail_the_pod(cri_containerd: CriContainerd) -> None:
    cases = [(api_pb2.LinuxContainerResources(cpu_period=100_000, cpu_quota=-7), sizing.SANDBOX_CPU_QUOTA),
             (api_pb2.LinuxContainerResources(memory_limit_in_bytes=1 << 50), sizing.SANDBOX_MEMORY)]
    with Cri(cri_containerd.socket) as cri:
        for resources, name in cases:
            message = _run_pod_fails(cri_containerd, cri,
                                     _pod_config(f"badsize-{uuid.uuid4().hex[:6]}", resources=resources))
            assert f"{name}: " in message, message


@pytest.mark.vm
@pytest.mark.parametrize("handler", ["runc", "pykata"])
def test_cri_files_shm_and_volumes(cri_containerd: CriContainerd, tmp_path: Path, handler: str) -> None:
    rw, ro, files = tmp_path / "rw", tmp_path / "ro", tmp_path / "configmap"
    for d in (rw, ro, files):
        d.mkdir()
    (ro / "existing").write_text("read me\n")
    (files / "app.conf").write_text("key = value\n")
    dns = api_pb2.DNSConfig(servers=["10.254.0.53", "10.254.0.54"], searches=["pykata.test", "svc.local"],
                            options=["ndots:2"])
    name = f"files-{handler}-{uuid.uuid4().hex[:6]}"
    config = _pod_config(name, dns=dns)
    mounts = [api_pb2.Mount(container_path="/data/rw", host_path=str(rw)),
              api_pb2.Mount(container_path="/data/ro", host_path=str(ro), readonly=True),
              api_pb2.Mount(container_path="/etc/app/app.conf", host_path=str(files / "app.conf"), readonly=True)]
    with Cri(cri_containerd.socket) as cri, _pod(cri_containerd, cri, handler, config) as pod_id:
        c0 = _container(cri, pod_id, config, "c0", mounts=mounts)
        c1 = _container(cri, pod_id, config, "c1")
        for cid in (c0, c1):
            assert _sh(cri, cid, "hostname").strip() == name
            assert _sh(cri, cid, "cat /etc/hostname").strip() == name
            assert _sh(cri, cid, "cat /etc/hosts") == Path("/etc/hosts").read_text()
            resolv = _sh(cri, cid, "cat /etc/resolv.conf")
            assert resolv == ("search pykata.test svc.local\nnameserver 10.254.0.53\nnameserver 10.254.0.54\n"
                              "options ndots:2\n"), resolv
            assert _sh(cri, cid, "stat -f -c %T /dev/shm").strip() == "tmpfs"
        # the pod's /dev/shm is one file system for both containers
        _sh(cri, c0, "echo shared > /dev/shm/from-c0")
        assert _sh(cri, c1, "cat /dev/shm/from-c0") == "shared\n"
        _sh(cri, c1, "rm /dev/shm/from-c0")
        assert "No such file" in _sh(cri, c0, "cat /dev/shm/from-c0", ok=False)
        # hostPath read-write: both ways, while the container runs
        _sh(cri, c0, "echo from-container > /data/rw/out && sync")
        assert (rw / "out").read_text() == "from-container\n"
        (rw / "in").write_text("from-host\n")
        assert _sh(cri, c0, "cat /data/rw/in") == "from-host\n"
        # read-only: readable, a write fails with EROFS
        assert _sh(cri, c0, "cat /data/ro/existing") == "read me\n"
        assert "Read-only file system" in _sh(cri, c0, "echo x > /data/ro/new", ok=False)
        assert not (ro / "new").exists()
        # a single file (as a configmap or secret key is mounted), read-only
        assert _sh(cri, c0, "cat /etc/app/app.conf") == "key = value\n"
        assert "Read-only file system" in _sh(cri, c0, "echo x >> /etc/app/app.conf", ok=False)
        assert (files / "app.conf").read_text() == "key = value\n"


@pytest.mark.vm
def test_containerds_etc_files_are_copied_into_the_guest(cri_containerd: CriContainerd) -> None:
    """containerd binds the pod's /etc/hosts, /etc/hostname and /etc/resolv.conf into every container.
    They are copied into the guest (pykata.resources.crifiles), so a pod without host volumes needs no
    shared directory for them (a guest that mounted it cannot be snapshotted): no host mount is made
    for them, and the containers see one writable copy, as under runc they share the one host file."""
    name = f"etcfiles-{uuid.uuid4().hex[:6]}"
    config = _pod_config(name)
    with Cri(cri_containerd.socket) as cri, _pod(cri_containerd, cri, "pykata", config) as pod_id:
        c0 = _container(cri, pod_id, config, "c0")
        c1 = _container(cri, pod_id, config, "c1")
        sandbox = cri_containerd.dir / "root" / "io.containerd.grpc.v1.cri" / "sandboxes" / pod_id
        hosts = (sandbox / "hosts").read_text()
        for cid in (c0, c1):
            assert _sh(cri, cid, "cat /etc/hosts") == hosts
            assert _sh(cri, cid, "cat /etc/hostname") == (sandbox / "hostname").read_text()
            assert _sh(cri, cid, "cat /etc/resolv.conf") == (sandbox / "resolv.conf").read_text()
            # a guest tmpfs, not the host's file over 9p
            assert _sh(cri, cid, "stat -f -c %T /etc/hosts /etc/hostname /etc/resolv.conf").split() == ["tmpfs"] * 3
            host_mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                           if f"/mounts/{cid}/volumes/" in line]
            assert host_mounts == [], host_mounts
        # one copy for the pod: a write in one container is seen in the other (the host's file stays)
        _sh(cri, c0, "echo '10.9.9.9 added-by-c0' >> /etc/hosts")
        assert _sh(cri, c1, "tail -1 /etc/hosts") == "10.9.9.9 added-by-c0\n"
        assert (sandbox / "hosts").read_text() == hosts


def test_one_policy_for_pykata_run_and_the_sdk() -> None:
    """`pykata run --cpus/--memory` sizes a VM as a pod's limits do; the SDK's VM size is taken as it is;
    both go through the same fit (caps, max memory naming the option, bigger VMs boot cold)."""
    run = sizing.container_size(1.5, 512 * MIB, cpus_source="--cpus", memory_source="--memory")
    assert (run.vcpus, run.memory_mib) == (2, 512 + sizing.VM_MEMORY_OVERHEAD_MIB)
    assert sizing.container_size(None, 0, cpus_source="--cpus", memory_source="--memory") == sizing.PodSize(
        None, None, "--cpus", "--memory")
    assert (sizing.vm_size(2, 700, vcpus_source="cpus", memory_source="memory_mib").memory_mib) == 700
    with pytest.raises(InvalidArgument) as info:
        sizing.vm_size(2, 0, vcpus_source="cpus", memory_source="memory_mib")
    assert info.value.field == "memory_mib"
    config = parse_toml("[hypervisor.qemu]\nmachine_type = \"q35\"\ndefault_memory = 512\ndefault_maxmemory = 1024\n")
    with pytest.raises(InvalidArgument) as info:
        sizing.fit(config, sizing.container_size(None, 2048 * MIB, cpus_source="--cpus", memory_source="--memory"))
    assert info.value.field == "--memory"
