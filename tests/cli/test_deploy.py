"""deploy/kubernetes validates against Kubernetes' OpenAPI schema (kubernetes-validate's shipped schema,
no cluster here), and its parts fit together (the installer DaemonSet, its RBAC, the RuntimeClass's
label); `pykata install crio` gives CRI-O a valid shim-v2 runtime table."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pykata.deploy.image import image_config
from pykata.deploy.labels import LABEL

ROOT = Path(__file__).resolve().parents[2]
PYKATA = str(ROOT / ".venv/bin/pykata")
K8S_VERSION = "1.33.0"
MANIFESTS = sorted((ROOT / "deploy/kubernetes").glob("*.yaml"))


def docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}#{i}", d) for p in MANIFESTS for i, d in enumerate(yaml.safe_load_all(p.read_text())) if d]


@pytest.mark.parametrize("name,doc", docs(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_manifest() -> None:
    [(_, rc)] = [(n, d) for n, d in docs() if d["kind"] == "RuntimeClass"]
    bad = {**rc, "overhead": {"podFixed": ["384Mi"]}}  # a map in the schema
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**rc, "handlr": "typo"}, K8S_VERSION, strict=True)  # unknown field
    without_handler = {k: v for k, v in rc.items() if k != "handler"}  # a required field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(without_handler, K8S_VERSION, strict=True)


def test_example_pod_uses_the_runtime_class() -> None:
    kinds = {d["kind"]: d for _, d in docs()}
    assert kinds["Pod"]["spec"]["runtimeClassName"] == kinds["RuntimeClass"]["metadata"]["name"] == "pykata"  # type: ignore[index]
    assert kinds["RuntimeClass"]["handler"] == "pykata"


def test_install_crio_shows_and_writes_a_vm_runtime(tmp_path: Path) -> None:
    p = subprocess.run([PYKATA, "install", "crio"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    table = tomllib.loads(p.stdout)["crio"]["runtime"]["runtimes"]["pykata"]
    assert table["runtime_type"] == "vm" and table["runtime_path"].endswith("containerd-shim-pykata-v2")
    assert Path(table["runtime_path"]).exists()
    dropin = tmp_path / "crio.conf.d/50-pykata.conf"
    p = subprocess.run([PYKATA, "install", "crio", "--write", "--dropin", str(dropin)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and tomllib.loads(dropin.read_text()) == {"crio": {"runtime": {"runtimes": {
        "pykata": table}}}}


def _kind(kind: str) -> dict[str, Any]:
    [doc] = [d for _, d in docs() if d["kind"] == kind]
    return doc


def test_installer_daemonset_runs_the_installer_and_uninstalls_on_stop() -> None:
    ds = _kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["hostPID"] is True and c["securityContext"]["privileged"] is True
    assert "pykata install node --root /host" in " ".join(c["command"])
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["pykata", "install", "node", "--root", "/host",
                                                           "--uninstall"]
    [mount] = c["volumeMounts"]
    [volume] = pod["volumes"]
    assert mount["mountPath"] == "/host" and volume["hostPath"]["path"] == "/" and mount["name"] == volume["name"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    # the image's PATH has /usr/local/bin/pykata (pykata.deploy.image): the command and hook find it
    assert "PATH=/usr/local/bin" in " ".join(image_config()["Env"])
    sa = _kind("ServiceAccount")["metadata"]
    assert pod["serviceAccountName"] == sa["name"] and ds["metadata"]["namespace"] == sa["namespace"]


def test_installer_may_only_get_and_patch_nodes() -> None:
    assert _kind("ClusterRole")["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = _kind("ClusterRoleBinding")
    sa = _kind("ServiceAccount")["metadata"]
    assert binding["roleRef"]["name"] == _kind("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]


def test_runtime_class_schedules_onto_the_installers_label() -> None:
    assert _kind("RuntimeClass")["scheduling"]["nodeSelector"] == {LABEL: "true"}
