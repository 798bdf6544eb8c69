"""`pykata install node` on a temp-dir node without a containerd or a VM: what lands where, idempotence,
reruns after a stop halfway, --uninstall, and errors that name the path, field or command.

The payload here is a small one made by the `small_payload` fixture (the real layout with a tiny kernel
and initrd); tests/deploy/test_node_install.py installs the real one and runs a pod from it."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from pykata.config import packaged_default_text
from pykata.deploy import containerd_config, payload
from pykata.deploy.node import Node, NodeInstallError, install, uninstall

ORIGINAL = """version = 2
# the node's own configuration
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"""
PREFIX = Path("/opt/pykata")


@pytest.fixture
def small_payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload"
    (p / "venv/bin").mkdir(parents=True)
    (p / "venv/bin/python3.11").symlink_to("/usr/bin/python3.11")
    (p / "venv/bin/python").symlink_to("python3.11")
    (p / "share/pykata").mkdir(parents=True)
    (p / payload.KERNEL).write_bytes(b"kernel")
    (p / payload.INITRD).write_bytes(b"initrd")
    (p / payload.CONFIG_TEMPLATE).parent.mkdir()
    (p / payload.CONFIG_TEMPLATE).write_text(packaged_default_text())
    (p / payload.MANIFEST).write_text(json.dumps({"format": 1, "key": "k1", "version": "0",
                                                  "python": "/usr/bin/python3.11"}))
    return p


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "node"
    (r / "usr/bin").mkdir(parents=True)
    (r / "usr/bin/python3.11").touch()
    (r / "usr/bin/qemu-system-x86_64").touch()
    (r / "etc/containerd").mkdir(parents=True)
    (r / "etc/containerd/config.toml").write_text(ORIGINAL)
    return r


def _node(root: Path, **kw: object) -> Node:
    kw.setdefault("restart_command", ["sh", "-c", f"echo restart >> {root}/restarts"])
    return Node(root=root, prefix=PREFIX, label=False, **kw)  # type: ignore[arg-type]


def _restarts(root: Path) -> int:
    try:
        return len((root / "restarts").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_install_twice_then_uninstall_twice(root: Path, small_payload: Path) -> None:
    said: list[str] = []
    install(_node(root), small_payload, say=said.append)
    target = root / "opt/pykata"
    assert payload.load(target).key == "k1" and _restarts(root) == 1
    shim = (target / payload.SHIM).read_text()
    assert shim.startswith("#!/opt/pykata/venv/bin/python\n") and "pykata.shim.main" in shim
    assert os.access(target / payload.SHIM, os.X_OK)
    config = (target / payload.CONFIG).read_text()
    assert 'kernel = "/opt/pykata/share/pykata/vmlinux"' in config
    assert 'initrd = "/opt/pykata/share/pykata/rootfs.cpio"' in config
    assert os.readlink(root / "usr/local/bin/containerd-shim-pykata-v2") == "/opt/pykata/bin/containerd-shim-pykata-v2"
    cfg = root / "etc/containerd/config.toml"
    merged = cfg.read_text()
    assert merged.startswith(ORIGINAL) and 'ConfigPath = "/opt/pykata/etc/configuration.toml"' in merged
    stamp = (target / payload.CONFIG).stat().st_mtime_ns

    said.clear()
    install(_node(root), small_payload, say=said.append)  # nothing changes, no restart
    assert _restarts(root) == 1 and cfg.read_text() == merged
    assert (target / payload.CONFIG).stat().st_mtime_ns == stamp
    assert any("already there" in s for s in said) and any("up to date" in s for s in said), said

    uninstall(_node(root), say=said.append)
    assert cfg.read_bytes() == ORIGINAL.encode() and _restarts(root) == 2
    assert not target.exists() and not (root / "usr/local/bin/containerd-shim-pykata-v2").is_symlink()
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]  # no backup, no marker left
    uninstall(_node(root), say=said.append)
    assert _restarts(root) == 2 and cfg.read_bytes() == ORIGINAL.encode()


def test_a_failed_restart_is_retried_by_the_next_run(root: Path, small_payload: Path) -> None:
    with pytest.raises(NodeInstallError) as e:
        install(_node(root, restart_command=["sh", "-c", "echo containerd is busy >&2; exit 3"]), small_payload,
                say=lambda _: None)
    assert "--restart-command sh -c" in str(e.value) and "exited 3: containerd is busy" in str(e.value)
    assert containerd_config.BEGIN in (root / "etc/containerd/config.toml").read_text()
    install(_node(root), small_payload, say=lambda _: None)  # the configuration is in: only the restart is left
    assert _restarts(root) == 1
    install(_node(root), small_payload, say=lambda _: None)
    assert _restarts(root) == 1


def test_leftovers_of_a_stopped_copy_are_cleared(root: Path, small_payload: Path) -> None:
    (root / "opt/pykata.new/venv").mkdir(parents=True)  # a copy stopped halfway
    (root / "opt/pykata.old").mkdir()
    install(_node(root), small_payload, say=lambda _: None)
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["pykata"]
    changed = json.loads((small_payload / payload.MANIFEST).read_text()) | {"key": "k2"}
    (small_payload / payload.MANIFEST).write_text(json.dumps(changed))
    install(_node(root), small_payload, say=lambda _: None)  # a new payload replaces the old one
    assert payload.load(root / "opt/pykata").key == "k2" and sorted(p.name for p in (root / "opt").iterdir()) == [
        "pykata"]


@pytest.mark.parametrize("change,needle", [
    (lambda r, p: (r / "usr/bin/python3.11").unlink(), "the node has no /usr/bin/python3.11"),
    (lambda r, p: (r / "usr/bin/qemu-system-x86_64").unlink(),
     "hypervisor.qemu.path: the node has no /usr/bin/qemu-system-x86_64"),
    (lambda r, p: (p / payload.KERNEL).unlink(), "share/pykata/vmlinux: missing from the payload"),
    (lambda r, p: (p / payload.MANIFEST).write_text('{"format": 9}'), "is not payload format 1"),
    (lambda r, p: (r / "etc/containerd/config.toml").write_text("version = 7\n"), "version = 7"),
    (lambda r, p: ((r / "usr/local/bin").mkdir(parents=True), (r / "usr/local/bin/containerd-shim-pykata-v2").touch()),
     "containerd-shim-pykata-v2 exists and is not a link"),
])
def test_errors_name_what_is_wrong(root: Path, small_payload: Path, change: object, needle: str) -> None:
    change(root, small_payload)  # type: ignore[operator]
    with pytest.raises(NodeInstallError) as e:
        install(_node(root), small_payload, say=lambda _: None)
    assert needle in str(e.value), str(e.value)
    assert _restarts(root) == 0


def test_a_bad_configuration_is_refused_before_anything_changes(root: Path, small_payload: Path,
                                                                tmp_path: Path) -> None:
    bad = tmp_path / "pykata.toml"
    bad.write_text(packaged_default_text().replace("default_vcpus = 1", "default_vcpus = -3"))
    with pytest.raises(NodeInstallError, match="default_vcpus"):
        install(_node(root), small_payload, bad, say=lambda _: None)
    assert not (root / "opt").exists() and (root / "etc/containerd/config.toml").read_text() == ORIGINAL


@pytest.mark.parametrize("kw,needle", [
    ({"prefix": Path("opt/pykata")}, "--prefix: opt/pykata must be an absolute node path"),
    ({"prefix": Path("/")}, "--prefix: / is not a directory pykata can own"),
    ({"bin_dir": Path("/usr/../bin")}, "--bin-dir"),
    ({"root": Path("/nonexistent-node-root")}, "--root: /nonexistent-node-root is not a directory"),
])
def test_bad_paths_are_refused(kw: dict[str, Path], needle: str) -> None:
    with pytest.raises(NodeInstallError) as e:
        Node(**kw)  # type: ignore[arg-type]
    assert needle in str(e.value)


def test_uninstall_never_removes_a_directory_that_is_not_a_payload(root: Path) -> None:
    (root / "opt/pykata").mkdir(parents=True)
    (root / "opt/pykata/important").write_text("not ours")
    with pytest.raises(NodeInstallError, match="not a pykata payload"):
        uninstall(_node(root), say=lambda _: None)
    assert (root / "opt/pykata/important").exists()


def test_node_symlinks_resolve_inside_the_node_root(root: Path, small_payload: Path) -> None:
    # a node whose containerd configuration is a link (k0s, some distributions) and whose /opt is a link
    # with an absolute target: both must land under the node's root, not this machine's
    (root / "var/lib/k0s").mkdir(parents=True)
    cfg = root / "etc/containerd/config.toml"
    cfg.rename(root / "var/lib/k0s/containerd.toml")
    cfg.symlink_to("/var/lib/k0s/containerd.toml")
    (root / "var/opt").mkdir()
    (root / "opt").symlink_to("/var/opt")
    install(_node(root), small_payload, say=lambda _: None)
    assert cfg.is_symlink() and containerd_config.BEGIN in (root / "var/lib/k0s/containerd.toml").read_text()
    assert payload.load(root / "var/opt/pykata").key == "k1"
    uninstall(_node(root), say=lambda _: None)
    assert cfg.is_symlink() and (root / "var/lib/k0s/containerd.toml").read_text() == ORIGINAL
    assert not (root / "var/opt/pykata").exists()
    (root / "loop").symlink_to("/loop")
    with pytest.raises(NodeInstallError, match="too many levels of symbolic links"):
        _node(root).host(Path("/loop/x"))


def test_crio_gets_a_drop_in_and_loses_it_again(root: Path, small_payload: Path) -> None:
    (root / "etc/crio/crio.conf.d").mkdir(parents=True)
    dropin = root / "etc/crio/crio.conf.d/50-pykata.conf"
    crio = {"container_runtime": "crio"}
    install(_node(root, **crio), small_payload, say=lambda _: None)
    table = tomllib.loads(dropin.read_text())["crio"]["runtime"]["runtimes"]["pykata"]
    assert table["runtime_type"] == "vm" and table["runtime_path"] == "/opt/pykata/bin/containerd-shim-pykata-v2"
    assert table["runtime_config_path"] == "/opt/pykata/etc/configuration.toml"
    assert _restarts(root) == 1 and (root / "etc/containerd/config.toml").read_text() == ORIGINAL
    install(_node(root, **crio), small_payload, say=lambda _: None)
    assert _restarts(root) == 1
    uninstall(_node(root, **crio), say=lambda _: None)
    assert not dropin.exists() and _restarts(root) == 2 and not (root / "opt/pykata").exists()
    assert sorted(p.name for p in dropin.parent.iterdir()) == []
    dropin.write_text("[crio.runtime]\n")  # the admin's own file at that name: never overwritten or removed
    with pytest.raises(NodeInstallError, match=r"50-pykata\.conf: exists and was not written by pykata"):
        install(_node(root, **crio), small_payload, say=lambda _: None)
    with pytest.raises(NodeInstallError, match=r"50-pykata\.conf: was not written by pykata"):
        uninstall(_node(root, **crio), say=lambda _: None)
    assert dropin.read_text() == "[crio.runtime]\n"
    with pytest.raises(NodeInstallError, match="--container-runtime: 'docker' is not one of containerd, crio"):
        _node(root, container_runtime="docker")


def test_uninstall_goes_on_when_the_label_cannot_be_removed(root: Path, small_payload: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    install(_node(root), small_payload, say=lambda _: None)
    # in a pod whose service account has no token (the RBAC deleted first, say): the label step fails
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    with pytest.raises(NodeInstallError, match="cannot unlabel node node-1: no usable service account"):
        uninstall(Node(root=root, prefix=PREFIX, node_name="node-1",
                       restart_command=["sh", "-c", f"echo restart >> {root}/restarts"]), say=lambda _: None)
    assert (root / "etc/containerd/config.toml").read_text() == ORIGINAL and not (root / "opt/pykata").exists()
