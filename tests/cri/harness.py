"""A private containerd 1.6 (Debian's) with the CRI plugin enabled, and a small CRI client.

Like tests/shim/harness.py (whose Containerd it extends), containerd gets its own root, state, sockets
and config in a temp dir. The CRI plugin is configured as ARCHITECTURE.md says works on these machines:
restrict_oom_score_adj, a local pause image (pykata's built-in `pause`, whose entrypoint sleeps
forever) as sandbox_image, CNI plugins from /usr/lib/cni (a bridge with host-local addresses, inside
containerd's own network namespace), and two runtime handlers: `runc` and `pykata` (io.containerd.pykata.v2).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from cri_api.v1 import api_pb2, api_pb2_grpc

from pykata.config import find_config_path, packaged_default_text, parse_toml
from pykata.images import ImageStore
from pykata.images.builtin import export_oci_archive
from tests.shim.harness import CONTAINERD, SHIM, Containerd

NAMESPACE = "k8s.io"  # where the CRI plugin keeps its images, containers and tasks
PAUSE_IMAGE = "pykata.local/pause:latest"
BUSYBOX_IMAGE = "pykata.local/busybox:latest"
CNI_BIN_DIR = Path("/usr/lib/cni")
CALL_TIMEOUT = 60.0  # every CRI call: a hang is a failure, never a wait
# What kubelet sets for a pod without shareProcessNamespace (CRI's unset value, 0, means pid=POD)
KUBELET_NAMESPACES = api_pb2.NamespaceOption(pid=api_pb2.CONTAINER)

CRI_CONFIG = """version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]
      runtime_type = "io.containerd.pykata.v2"
      pod_annotations = ["io.katacontainers.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata.options]
        ConfigPath = "{pykata_config}"
"""

# CRI wants an address on the pod's eth0: a bridge with host-local addresses, all inside containerd's own
# network namespace (see CriContainerd), so the host's network is never touched
CNI_CONF = """{{"cniVersion": "0.4.0", "name": "pykata-test", "plugins": [
  {{"type": "bridge", "bridge": "pkcri0", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "dataDir": "{data}", "ranges": [[{{"subnet": "10.254.0.0/24"}}]]}}}}]}}
"""
# Both families: an IPv6 range too, default routes of both (tests/security/test_ipv6_spoofing.py)
CNI_CONF_DUAL_STACK = """{{"cniVersion": "0.4.0", "name": "pykata-test", "plugins": [
  {{"type": "bridge", "bridge": "pkcri0", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "dataDir": "{data}",
             "ranges": [[{{"subnet": "10.254.0.0/24"}}], [{{"subnet": "fd00:254::/64"}}]],
             "routes": [{{"dst": "0.0.0.0/0"}}, {{"dst": "::/0"}}]}}}}]}}
"""


def admin_config(path: Path, **runtime: str) -> Path:
    """Write to `path` the configuration the tests run with ($PYKATA_CONFIG, /etc/pykata or the packaged
    default) with `[runtime]` keys replaced by `runtime` (TOML values), as an admin would edit it."""
    found = find_config_path()
    text = found.read_text() if found is not None else packaged_default_text()
    for key, value in runtime.items():
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        if n == 0:
            text = text.replace("[runtime]\n", f"[runtime]\n{key} = {value}\n", 1)
    assert parse_toml(text), text
    path.write_text(text)
    return path


def set_keys(path: Path, lines: str) -> None:
    """Set `table.key = value` lines (e.g. `agent.pykata.debug_console_enabled = true`) in the
    configuration file at `path`, whose table must hold the key already (the packaged default's do)."""
    text = path.read_text()
    for line in filter(None, (x.strip() for x in lines.splitlines())):
        dotted, _, value = line.partition("=")
        table, _, key = dotted.strip().rpartition(".")
        start = text.index(f"[{table}]\n")
        end = text.find("\n[", start + 1)
        end = len(text) if end < 0 else end
        section, n = re.subn(rf"(?m)^#?\s*{key}\s*=.*$", f"{key} = {value.strip()}", text[start:end], count=1)
        assert n == 1, f"{key} is not in [{table}] of {path}"
        text = text[:start] + section + text[end:]
    assert parse_toml(text), text
    path.write_text(text)


def missing_cri_prerequisites() -> str | None:
    """What scripts/install.sh should have provided for the CRI tests and did not (None when all is there)."""
    from tests.shim.harness import missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        return missing
    if not (CNI_BIN_DIR / "loopback").exists():
        return f"{CNI_BIN_DIR}/loopback (Debian containernetworking-plugins)"
    return None


@contextlib.contextmanager
def running_cri_containerd(directory: Path, cache: Path, runtime_config: dict[str, str] | None = None,
                           *, cni_conf: str = CNI_CONF, extra_config: str = "") -> Iterator[CriContainerd]:
    """A started CriContainerd in `directory`, its images imported (from `cache`); stopped after, and
    no shim may outlive it. Its prerequisites (scripts/install.sh installs them all) missing fails the
    test: a broken setup, not a reason to skip."""
    missing = missing_cri_prerequisites()
    if missing:
        raise AssertionError(f"the CRI tests need {missing}")
    ctd = CriContainerd(directory, runtime_config=runtime_config or {}, cni_conf=cni_conf,
                        extra_config=extra_config)
    try:
        ctd.start()
        ctd.import_images(cache)
        yield ctd
    finally:
        ctd.stop()
        assert not ctd.shims(), "a shim outlived containerd's teardown"


@dataclass
class CriContainerd(Containerd):
    """A private containerd with its CRI plugin on, its images imported into k8s.io."""

    namespace: str = NAMESPACE
    netns: str = field(default_factory=lambda: f"pykata-cri-{uuid.uuid4().hex[:8]}")
    # keys of [runtime] in the admin configuration the pykata runtime handler gets (options.ConfigPath)
    runtime_config: dict[str, str] = field(default_factory=dict)
    cni_conf: str = CNI_CONF  # the CNI network list (format field: data, host-local's directory)
    # "table.key = value" lines for other tables of that configuration (their key must be in the file)
    extra_config: str = ""
    # what else names a pod's parts (pod_parts): a pooled VM's entry id, its shim's pid; found while it runs
    _parts: dict[str, tuple[set[str], set[int]]] = field(default_factory=dict, init=False, repr=False)

    @property
    def pod_configs(self) -> Path:
        """The directory the admin configuration lists in runtime.valid_config_paths: pods may name the
        configuration files a test puts there with io.katacontainers.config_path."""
        return self.dir / "pod-configs"

    def config_text(self) -> str:
        """containerd's configuration (CRI_CONFIG), writing the pykata configuration it names."""
        self.pod_configs.mkdir(mode=0o755, parents=True, exist_ok=True)
        pykata_config = admin_config(self.dir / "pykata.toml", **{
            "valid_config_paths": f'["{self.pod_configs}"]', **self.runtime_config})
        if self.extra_config:
            set_keys(pykata_config, self.extra_config)
        return CRI_CONFIG.format(root=self.dir / "root", state=self.state, sock=self.socket, pause=PAUSE_IMAGE,
                                 cni_bin=CNI_BIN_DIR, cni_conf=self.dir / "cni", pykata_config=pykata_config)

    def config_file(self) -> Path:
        """The file containerd starts with."""
        config = self.dir / "config.toml"
        config.write_text(self.config_text())
        return config

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cni_conf = self.dir / "cni"
        cni_conf.mkdir(exist_ok=True)
        (cni_conf / "10-pykata-test.conflist").write_text(self.cni_conf.format(data=self.dir / "cni-ipam"))
        config = self.config_file()
        assert CONTAINERD is not None
        with open(self.log, "ab") as log:
            # containerd (and so its shims and the CNI plugins) in a network namespace of its own, and
            # nothing else of its own: a mount namespace would hide the shims' mounts from the host
            if not Path(f"/var/run/netns/{self.netns}").exists():
                subprocess.run(["ip", "netns", "add", self.netns], check=True)
                subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
            argv = ["nsenter", f"--net=/var/run/netns/{self.netns}", CONTAINERD, "--config", str(config)]
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log,
                                         env=self.env(), start_new_session=True)
        self.wait_up()

    def import_images(self, cache: Path) -> None:
        store = ImageStore(cache)
        for name, ref in (("pause", PAUSE_IMAGE), ("busybox", BUSYBOX_IMAGE)):
            archive = export_oci_archive(store.resolve(name), self.dir / f"{name}.tar", ref)
            self.ctr("images", "import", "--base-name", ref.rsplit(":", 1)[0], str(archive))

    def stop(self) -> None:
        """Remove every pod through CRI, then everything else as the shim harness does."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception), Cri(self.socket) as cri:
                for pod in cri.list_pods():
                    with contextlib.suppress(Exception):
                        cri.stop_pod(pod.id)
                    with contextlib.suppress(Exception):
                        cri.remove_pod(pod.id)
        try:
            super().stop()
        finally:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)

    @property
    def pykata_runtime_dirs(self) -> list[str]:
        """Where the pykata handler keeps its sandboxes: /run/pykata, or the runtime_dir it is configured with."""
        dirs = ["/run/pykata", "/var/run/pykata"]
        configured = self.runtime_config.get("runtime_dir", "").strip('"')
        return [*dirs, configured] if configured else dirs

    def pod_parts(self, pod_id: str) -> tuple[set[str], set[int]]:
        """Other names of pod `pod_id`'s parts than its id, remembered from the first call while the pod
        runs: the warm pool's entry id when the pod took a pooled VM (sandboxes/<id> links to
        pool/<entry>; its QEMU's command line names the entry), and its shim's pid (a pooled shim's
        command line names neither)."""
        names, pids = self._parts.setdefault(pod_id, (set(), set()))
        for base in self.pykata_runtime_dirs:
            link = Path(base) / "sandboxes" / pod_id
            if link.is_symlink():
                names.add(Path(os.readlink(link)).name)
        with contextlib.suppress(OSError, ValueError):
            bundle = self.state / "io.containerd.runtime.v2.task" / self.namespace / pod_id
            pids.add(int((bundle / "shim.pid").read_text()))
        return names, pids

    def pod_leftovers(self, pod_id: str) -> list[str]:
        """What of pod `pod_id` is still there: shim, QEMU, virtiofsd processes, /run/pykata mounts
        and directories, CRI sandbox dirs. Empty when the pod is fully gone."""
        left: list[str] = []
        aliases, shim_pids = self.pod_parts(pod_id)
        names = {pod_id, *aliases}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if not any(k in cmd for k in (SHIM.name, "qemu-system", "virtiofsd", "containerd-shim", "virtfs-proxy")):
                continue
            if p.pid in shim_pids or any(n in cmd for n in names):
                left.append(f"process {p.pid}: {cmd[:120]}")
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4]
                if any(n in mp for n in names):
                    left.append(f"mount {mp}")
        for cg, dirnames, _ in os.walk("/sys/fs/cgroup"):
            if cg.count("/") > 6:  # cgroups of pods sit a few levels down at most
                dirnames.clear()
            left += [f"cgroup {cg}/{d}" for d in dirnames if pod_id in d]
        for base in (*self.pykata_runtime_dirs, str(self.state / "io.containerd.grpc.v1.cri" / "sandboxes"),
                     str(self.dir / "root" / "io.containerd.grpc.v1.cri" / "sandboxes")):
            with contextlib.suppress(OSError):
                for dirpath, dirnames, _ in os.walk(base):
                    left += [f"dir {dirpath}/{d}" for d in dirnames if any(n in d for n in names)]
                    if dirpath.count("/") - base.count("/") >= 2:  # not down into the sandboxes' rootfs trees
                        dirnames.clear()
        return left


@dataclass
class Cri:
    """CRI v1 RuntimeService over containerd's unix socket; every call times out after CALL_TIMEOUT."""

    socket: Path
    timeout: float = CALL_TIMEOUT
    channel: grpc.Channel | None = field(default=None, init=False)

    def __enter__(self) -> Cri:
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.channel is not None:
            self.channel.close()

    def run_pod(self, name: str, handler: str, annotations: dict[str, str] | None = None) -> tuple[str, Any]:
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="pykata-test", attempt=0),
            hostname=name[:63], annotations=annotations or {}, linux=api_pb2.LinuxPodSandboxConfig(
                security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=KUBELET_NAMESPACES)))
        reply = self.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                      timeout=self.timeout)
        return reply.pod_sandbox_id, config

    def create_container(self, pod_id: str, pod_config: Any, name: str, image: str, command: list[str]) -> str:
        config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name),
                                         image=api_pb2.ImageSpec(image=image), command=command,
                                         linux=api_pb2.LinuxContainerConfig(
                                             security_context=api_pb2.LinuxContainerSecurityContext(
                                                 namespace_options=KUBELET_NAMESPACES)))
        reply = self.rt.CreateContainer(api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=self.timeout)
        return str(reply.container_id)

    def start_container(self, cid: str) -> None:
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=self.timeout)

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 30) -> Any:
        return self.rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                                timeout=self.timeout)

    def container_state(self, cid: str) -> str:
        reply = self.rt.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=self.timeout)
        return api_pb2.ContainerState.Name(reply.status.state)

    def stop_pod(self, pod_id: str) -> None:
        self.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def pod_netns(self, pod_id: str) -> str | None:
        """The path of the pod's network namespace, from the verbose PodSandboxStatus."""
        reply = self.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True),
                                         timeout=self.timeout)
        spec = json.loads(reply.info.get("info", "{}")).get("runtimeSpec", {})
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                return str(ns["path"])
        return None

    def pod_ip(self, pod_id: str) -> str:
        """The pod's IP address as CNI gave it (PodSandboxStatus.network.ip)."""
        reply = self.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                         timeout=self.timeout)
        return str(reply.status.network.ip)

    def list_pods(self) -> list[Any]:
        return list(self.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=self.timeout).items)


def wait_gone(ctd: CriContainerd, pod_id: str, within: float = 20) -> list[str]:
    """The pod's leftovers once they stop shrinking (shims exit shortly after RemovePodSandbox)."""
    deadline = time.monotonic() + within
    left = ctd.pod_leftovers(pod_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = ctd.pod_leftovers(pod_id)
    return left


@contextlib.contextmanager
def one_container_pod(cri: Cri, name: str, handler: str, command: list[str],
                      ctd: CriContainerd | None = None) -> Iterator[tuple[str, str]]:
    """A pod with one busybox container running `command`; yields (pod id, container id); afterwards
    the pod is stopped and removed, and with `ctd` nothing of it may be left (wait_gone)."""
    pod_id, config = cri.run_pod(name, handler)
    try:
        cid = cri.create_container(pod_id, config, "c", BUSYBOX_IMAGE, command)
        cri.start_container(cid)
        yield pod_id, cid
    finally:
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)
    if ctd is not None:
        left = wait_gone(ctd, pod_id)
        assert not left, f"pod {pod_id} left {left}"
