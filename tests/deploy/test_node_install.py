"""The node installer end to end, as the DaemonSet runs it, on "a node" whose / is a temp directory:

the installer image (scripts/build-deploy-image.sh's OCI layout, cached in build/deploy/image) is
checked blob by blob, imported into a private containerd (CRI on) and run there with runc, the node's
root bind-mounted at /host, as the DaemonSet runs it. containerd, restarted on the installed
configuration as systemd would, then runs a pod with the `pykata` runtime handler from the installed
payload alone (the test venv's shim is not on its PATH); the pod's container runs on the payload's
guest kernel. The installer run again with --uninstall leaves the configuration byte-for-byte the
original and no payload, link or backup. One VM boot (no template: the test's configuration says so).

containerd here runs on this machine's /, not the node's: the payload's node path (--prefix) is made
visible at the same path on this machine by a symlink to where the installer put it under the node's
root, as it would be on a real node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.config import load_config, packaged_default_text
from pykata.deploy import containerd_config, image, ocilayout, payload
from pykata.hypervisor.accel import resolve_accelerator
from pykata.hypervisor.qemu.assets import resolve_kernel
from tests.cri.harness import BUSYBOX_IMAGE, Cri, CriContainerd, missing_cri_prerequisites, wait_gone

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "build/deploy/image"
INSTALLER = "pykata.local/pykata-deploy"


class NodeContainerd(CriContainerd):
    """The node's containerd: its configuration is the node's /etc/containerd/config.toml (the installer
    edits it), and its PATH is the node's /usr/local/bin and the system's, not the test venv's bin."""

    node: Path = Path("/nonexistent")

    @property
    def node_config(self) -> Path:
        return self.node / "etc/containerd/config.toml"

    def original_config(self) -> str:
        """The node's configuration before pykata: the CRI test configuration without its pykata handler."""
        text = self.config_text()
        handler = r'^    \[plugins\."io\.containerd\.grpc\.v1\.cri"\.containerd\.runtimes\.pykata\].*\Z'
        return re.sub(f"(?ms){handler}", "", text)

    def config_file(self) -> Path:
        return self.node_config

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.node / 'usr/local/bin'}:/usr/sbin:/usr/bin:/sbin:/bin"}

    def run_installer(self, name: str, *args: str) -> str:
        p = self.ctr("run", "--rm", "--privileged", "--mount",
                     f"type=bind,src={self.node},dst=/host,options=rbind:rw", f"{INSTALLER}:latest", name,
                     "/usr/local/bin/pykata", "install", "node", "--root", "/host", *args, timeout=300)
        return p.stdout.decode() + p.stderr.decode()


def admin_configuration() -> str:
    """The pykata configuration the test installs: no template (one VM boot), and the accelerator this
    machine's verdict chose for the test venv's kernel (the payload's kernel is a copy of it: no new
    KVM trial boot)."""
    config = load_config()
    verdict = asyncio.run(resolve_accelerator(config.qemu, resolve_kernel(config), config.runtime.cache_path))
    text = packaged_default_text()
    text, n = re.subn(r"(?m)^enable_template = true$", "enable_template = false", text)
    text, m = re.subn(r'(?m)^accelerator = "auto"$', f'accelerator = "{verdict.accel}"', text)
    assert n == 1 and m == 1
    return text


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeContainerd, str]]:
    missing = missing_cri_prerequisites()
    if missing:
        pytest.fail(f"the deploy test needs {missing}")
    root = tmp_path / "node"
    (root / "usr/bin").mkdir(parents=True)
    # the installer checks that the node has Debian's python3.11 and QEMU (this machine's, which containerd
    # here uses: it runs on this machine's /)
    (root / "usr/bin/python3.11").touch()
    (root / "usr/bin/qemu-system-x86_64").touch()
    (root / "etc/containerd").mkdir(parents=True)
    prefix = f"/run/pykata-deploy-test-{uuid.uuid4().hex[:8]}"
    seen_here = Path(prefix)
    seen_here.symlink_to(root / prefix.lstrip("/"))
    ctd = NodeContainerd(tmp_path / "containerd")
    ctd.node = root
    try:
        yield ctd, prefix
    finally:
        try:
            ctd.stop()
        finally:
            seen_here.unlink()
            shutil.rmtree(root / prefix.lstrip("/"), ignore_errors=True)


@pytest.mark.vm
def test_installer_image_installs_pykata_on_a_node_runs_a_pod_and_uninstalls(
        node: tuple[NodeContainerd, str], tmp_path: Path) -> None:
    ctd, prefix = node
    root = ctd.node

    config = image.build(LAYOUT)  # cached: seconds unless pykata's sources changed
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/pykata", "install", "node"]
    assert ocilayout.verify(LAYOUT) == config  # every blob's digest and size, diff_ids = layers

    original = ctd.original_config()
    assert "runtimes.pykata" not in original and "pykata.v2" not in original
    ctd.node_config.write_text(original)
    (root / "pykata.toml").write_text(admin_configuration())
    ctd.start()
    ctd.import_images(tmp_path / "cache")
    tar = subprocess.Popen(["tar", "-C", str(LAYOUT), "-cf", "-", "oci-layout", "index.json", "blobs"],
                           stdout=subprocess.PIPE)
    assert tar.stdout is not None
    imported = subprocess.run(["ctr", "-a", str(ctd.socket), "-n", ctd.namespace, "images", "import",
                               "--base-name", INSTALLER, "-"], stdin=tar.stdout, capture_output=True, timeout=300,
                              check=False)
    tar.stdout.close()
    assert tar.wait(60) == 0 and imported.returncode == 0, imported.stderr

    # the image's Kubernetes client (only the label step loads it) imports with the image's own Python
    probe = ctd.ctr("run", "--rm", f"{INSTALLER}:latest", "pykata-deploy-probe",
                    f"{image.ARTIFACTS}/venv/bin/python", "-c",
                    "import kubernetes.client, pykata.deploy.labels; print(kubernetes.__version__)")
    assert probe.stdout.decode().strip() == image.KUBERNETES_PIN.split("==")[1]

    out = ctd.run_installer("pykata-deploy-install", "--prefix", prefix, "--configuration", "/host/pykata.toml",
                            "--restart-command", "touch /host/containerd-restarted")
    assert "not running in a Kubernetes pod" in out and "node not labeled" in out, out
    assert (root / "containerd-restarted").exists(), out
    merged = ctd.node_config.read_text()
    assert merged.startswith(original) and containerd_config.BEGIN in merged
    assert containerd_config.backup_path(ctd.node_config).read_text() == original
    installed = root / prefix.lstrip("/")
    assert payload.load(installed).key == payload.load(ROOT / "build/deploy/work/payload").key
    link = root / "usr/local/bin/containerd-shim-pykata-v2"
    assert os.readlink(link) == f"{prefix}/bin/containerd-shim-pykata-v2"

    # a second install changes nothing (and does not restart containerd)
    (root / "containerd-restarted").unlink()
    again = ctd.run_installer("pykata-deploy-again", "--prefix", prefix, "--configuration", "/host/pykata.toml",
                              "--restart-command", "touch /host/containerd-restarted", "--no-label")
    assert "already" in again and not (root / "containerd-restarted").exists(), again
    assert ctd.node_config.read_text() == merged

    ctd.restart()  # as systemd would, on the installed configuration
    with Cri(ctd.socket) as cri:
        pod_id, pod_config = cri.run_pod("deploy", "pykata")
        try:
            cid = cri.create_container(pod_id, pod_config, "c", BUSYBOX_IMAGE, ["sleep", "300"])
            cri.start_container(cid)
            reply = cri.exec_sync(cid, ["uname", "-r"])
            assert reply.exit_code == 0 and reply.stdout.decode().strip().endswith("-pykata"), reply
            shims = [" ".join(p.cmdline()) for p in ctd.shims() if "pykata" in " ".join(p.cmdline()[:2])]
            # containerd ran the node's link, which runs the payload's python
            ran = f"{prefix}/venv/bin/python {link} "
            assert shims and all(s.startswith(ran) for s in shims), shims
        finally:
            with contextlib.suppress(Exception):
                cri.stop_pod(pod_id)
            cri.remove_pod(pod_id)
    assert wait_gone(ctd, pod_id) == []

    out = ctd.run_installer("pykata-deploy-uninstall", "--prefix", prefix, "--uninstall",
                            "--restart-command", "touch /host/containerd-restarted")
    assert "equals its backup" in out and (root / "containerd-restarted").exists(), out
    assert ctd.node_config.read_bytes() == original.encode()
    assert not containerd_config.backup_path(ctd.node_config).exists()
    assert not installed.exists() and not link.is_symlink()
    deadline = time.monotonic() + 5
    while ctd.tasks() and time.monotonic() < deadline:  # the installer's own task (ctr run --rm)
        time.sleep(0.1)
