"""deploy/kubernetes validates against Kubernetes' OpenAPI schema (kubernetes-validate's shipped schema,
no cluster here); `pykata install crio` gives CRI-O a valid shim-v2 runtime table."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PYKATA = str(ROOT / ".venv/bin/pykata")
K8S_VERSION = "1.33.0"
MANIFESTS = sorted((ROOT / "deploy/kubernetes").glob("*.yaml"))


def docs() -> list[tuple[str, dict[str, object]]]:
    return [(f"{p.name}#{i}", d) for p in MANIFESTS for i, d in enumerate(yaml.safe_load_all(p.read_text())) if d]


@pytest.mark.parametrize("name,doc", docs(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, object]) -> None:
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
