"""Hypothesis over the image store's JSON: index.json, the manifest, the config and docker's manifest.json
with a random value in place of any node, digests made right again (so the parser, not only the digest
check, sees it), and gzipped OCI archives cut short anywhere. Resolving must either work or raise an
ImageError, and leave no staging directory."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykata.images import ImageError, ImageStore
from pykata.images.layers import remove_tree
from tests.security.imagekit import archive_of, digest, fast_dir, file, layer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**64) | st.floats(allow_nan=False)
    | st.sampled_from(["", "sha256:" + "0" * 64, "../x", "amd64", "application/vnd.oci.image.index.v1+json"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["digest", "size", "mediaType", "manifests", "layers", "config", "platform",
                         "architecture", "rootfs", "diff_ids", "Cmd", "Env", "Entrypoint", "WorkingDir",
                         "User", "Config", "Layers"]), inner, max_size=3),
    max_leaves=6)


def _nodes(doc: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (keys and indices) to every node of a JSON document, the document itself first."""
    out = [here]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _nodes(value, (*here, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _nodes(value, (*here, i))
    return out


def _replace(doc: Any, pick: int, value: Any) -> Any:
    """`doc` with its node number `pick` (modulo their count) replaced by `value`."""
    nodes = _nodes(doc)
    path = nodes[pick % len(nodes)]
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


LAYER = layer([file("etc/hostname", b"fuzz\n")])


def _write_oci(root: Path, which: int, path: int, value: Any) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        (blobs / digest(data).split(":")[1]).write_bytes(data)
        return {"digest": digest(data), "size": len(data)}

    config: Any = {"architecture": "amd64", "config": {"Cmd": ["sh"], "Env": ["A=1"]},
                   "rootfs": {"type": "layers", "diff_ids": [digest(LAYER)]}}
    if which == 0:
        config = _replace(config, path, value)
    manifest: Any = {"schemaVersion": 2, "config": put(json.dumps(config).encode()),
                     "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(LAYER)}]}
    if which == 1:
        manifest = _replace(manifest, path, value)
    index: Any = {"schemaVersion": 2, "manifests": [put(json.dumps(manifest).encode())]}
    if which == 2:
        index = _replace(index, path, value)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps(index))


def _write_docker(archive: Path, path: int, value: Any) -> None:
    config = json.dumps({"config": {"Cmd": ["sh"]}, "rootfs": {"diff_ids": [digest(LAYER)]}}).encode()
    manifest = _replace([{"Config": "c.json", "Layers": ["l/layer.tar"]}], path, value)
    with tarfile.open(archive, "w") as t:
        for name, data in [("l/layer.tar", LAYER), ("c.json", config),
                           ("manifest.json", json.dumps(manifest).encode())]:
            t.addfile(file(name, data)[0], io.BytesIO(data))


def test_store_json_fuzz() -> None:
    outcomes = {"ok": 0, "refused": 0}
    with fast_dir("pykata-storefuzz-") as base:
        cache = base / "cache"

        @settings(max_examples=600, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.integers(0, 4), st.integers(0, 50), json_values)
        def run(which: int, path: int, value: Any) -> None:
            image = base / "image"
            try:
                if which == 4:  # an OCI archive, gzipped, cut short anywhere
                    _write_oci(base / "layout", 0, 0, {"rootfs": {"diff_ids": [digest(LAYER)]}})
                    data = gzip.compress(archive_of(base / "layout", base / "whole.tar").read_bytes(), 1)
                    remove_tree(base / "layout")
                    (base / "whole.tar").unlink()
                    image = base / "image.tar.gz"
                    image.write_bytes(data[:path * len(data) // 51])
                elif which == 3:
                    image = base / "image.tar"
                    _write_docker(image, path, value)
                else:
                    _write_oci(image, which, path, value)
                try:
                    img = ImageStore(cache).resolve(str(image))
                    assert (img.rootfs / "etc/hostname").read_bytes() == b"fuzz\n"
                    outcomes["ok"] += 1
                except ImageError as e:
                    assert str(image) in str(e)
                    outcomes["refused"] += 1
                assert not list((cache / "images").glob(".staging-*"))
            finally:
                if image.is_dir():
                    remove_tree(image)
                else:
                    image.unlink(missing_ok=True)

        run()
    assert outcomes["ok"] and outcomes["refused"], outcomes
