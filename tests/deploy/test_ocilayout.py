"""The OCI layout writer: reproducible layers, a layout `verify` accepts and that tar reads back, and
`verify` catching a blob that does not match its descriptor. (tests/deploy/test_node_install.py has
containerd import the installer image's layout and run it.)"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from pykata.deploy import ocilayout


def _tree(base: Path) -> Path:
    (base / "bin").mkdir(parents=True)
    (base / "bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (base / "bin/tool").chmod(0o755)
    (base / "bin/alias").symlink_to("tool")
    (base / "etc").mkdir()
    (base / "etc/conf").write_text("x = 1\n")
    os.link(base / "etc/conf", base / "etc/conf.hard")
    return base


def _write(layout: Path, tree: Path, key: str) -> ocilayout.Blob:
    layers = [ocilayout.LayerSource(tree, "/opt/app", key, "the test tree")]
    return ocilayout.write_image(layout, layers, {"Cmd": ["/opt/app/bin/tool"]}, "latest", 1704067200)


def test_layout_is_valid_reproducible_and_readable(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    first = _write(tmp_path / "a", tree, "k1")
    (tree / "etc/conf").touch()  # a new mtime: the layer is still the same bytes
    second = _write(tmp_path / "b", tree, "k1")
    assert first == second
    config = ocilayout.verify(tmp_path / "a")
    assert config["config"] == {"Cmd": ["/opt/app/bin/tool"]} and config["os"] == "linux"
    index = json.loads((tmp_path / "a/index.json").read_text())
    assert index["manifests"][0]["annotations"] == {ocilayout.REF_NAME: "latest"}
    manifest = json.loads(ocilayout.blob_path(tmp_path / "a", first.digest).read_bytes())
    [layer] = manifest["layers"]
    with tarfile.open(ocilayout.blob_path(tmp_path / "a", layer["digest"])) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members)[:3] == ["opt", "opt/app", "opt/app/bin"]
    assert members["opt/app/bin/alias"].issym() and members["opt/app/bin/alias"].linkname == "tool"
    assert members["opt/app/bin/tool"].mode == 0o755 and members["opt/app/bin/tool"].uid == 0
    assert members["opt/app/etc/conf.hard"].islnk() or members["opt/app/etc/conf"].islnk()
    assert {m.mtime for m in members.values()} == {1704067200}
    assert sorted(os.listdir(tmp_path / "a")) == ["blobs", "index.json", "oci-layout"]


def test_verify_names_a_blob_that_does_not_match(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "a", _tree(tmp_path / "tree"), "k1")
    layer = json.loads(ocilayout.blob_path(tmp_path / "a", manifest.digest).read_bytes())["layers"][0]
    path = ocilayout.blob_path(tmp_path / "a", layer["digest"])
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ocilayout.OciLayoutError) as e:
        ocilayout.verify(tmp_path / "a")
    assert str(path) in str(e.value) and "does not match its descriptor" in str(e.value)
    path.unlink()
    with pytest.raises(ocilayout.OciLayoutError, match="No such file"):
        ocilayout.verify(tmp_path / "a")


def test_a_cached_layer_is_not_reread_and_a_fifo_is_refused(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    first = _write(tmp_path / "a", tree, "k1")
    (tree / "etc/conf").write_text("changed\n")
    assert _write(tmp_path / "a", tree, "k1") == first  # same key: the cached layer
    assert _write(tmp_path / "a", tree, "k2") != first
    os.mkfifo(tree / "fifo")
    with pytest.raises(ocilayout.OciLayoutError, match=r"fifo: p.* is not a file, directory or link"):
        _write(tmp_path / "a", tree, "k3")
    assert not list((tmp_path / "a/blobs/sha256").glob(".layer-*"))  # no partial layer left
