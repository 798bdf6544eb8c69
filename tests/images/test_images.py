"""Image store: safe layer application, OCI layouts and archives, docker-save tarballs, bundles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from pykata.images import ImageError, ImageStore, LayerError, apply_layer
from pykata.images.builtin import export_oci_archive


def _tar(entries: list[tuple[str, str, bytes | str]]) -> io.BytesIO:
    """entries: (name, kind in f/d/l/h, content or link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "f":
                assert isinstance(data, bytes)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
                continue
            info.type = {"d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE, "h": tarfile.LNKTYPE}[kind]
            info.mode = 0o755
            if kind in "lh":
                assert isinstance(data, str)
                info.linkname = data
            t.addfile(info)
    buf.seek(0)
    return buf


def test_layers_stack_with_whiteouts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(_tar([("etc", "d", ""), ("etc/a", "f", b"1"), ("etc/b", "f", b"2"),
                      ("opt/x/y", "f", b"3"), ("bin/sh", "f", b"sh"), ("bin/ash", "h", "bin/sh")]), root)
    apply_layer(_tar([("etc/.wh.a", "f", b""), ("opt/x/.wh..wh..opq", "f", b""), ("opt/x/z", "f", b"4")]), root)
    assert not (root / "etc/a").exists()
    assert (root / "etc/b").read_bytes() == b"2"
    assert sorted(os.listdir(root / "opt/x")) == ["z"]
    assert os.stat(root / "bin/ash").st_ino == os.stat(root / "bin/sh").st_ino


@pytest.mark.parametrize("entries", [
    [("../evil", "f", b"x")],
    [("a/../../evil", "f", b"x")],
    [("link", "l", "/"), ("link/evil", "f", b"x")],  # write through a symlink to outside
    [("link", "l", "../.."), ("link/evil", "f", b"x")],
    [("h", "h", "../../etc/passwd")],
])
def test_layer_cannot_escape_the_root(tmp_path: Path, entries: list[tuple[str, str, bytes | str]]) -> None:
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    with pytest.raises(LayerError):
        apply_layer(_tar(entries), root)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    assert not Path("/evil").exists()


def test_absolute_names_are_made_relative(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(_tar([("/etc/abs", "f", b"ok")]), root)
    assert (root / "etc/abs").read_bytes() == b"ok"


def test_builtin_busybox_and_oci_archive_round_trip(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "cache")
    bb = store.resolve("busybox")
    assert (bb.rootfs / "bin/busybox").is_file() and os.readlink(bb.rootfs / "bin/sh") == "/bin/busybox"
    assert bb.config.cmd == ("sh",)
    assert store.resolve("busybox:latest").rootfs == bb.rootfs  # cached
    archive = export_oci_archive(bb, tmp_path / "bb.tar")
    img = store.resolve(str(archive))
    assert (img.rootfs / "bin/busybox").read_bytes() == (bb.rootfs / "bin/busybox").read_bytes()
    assert img.config.cmd == ("sh",)
    # the same archive unpacked as an OCI layout directory gives the same cached image
    layout = tmp_path / "layout"
    with tarfile.open(archive) as t:
        t.extractall(layout)  # our own archive: trusted
    assert store.resolve(str(layout)).rootfs == img.rootfs


def test_docker_save_tarball(tmp_path: Path) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as lt:
        data = b"#!/bin/sh\necho hi\n"
        info = tarfile.TarInfo("hello.sh")
        info.size, info.mode = len(data), 0o755
        lt.addfile(info, io.BytesIO(data))
    diff_id = "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()
    config = json.dumps({"config": {"Cmd": ["/hello.sh"], "Env": ["A=1"], "WorkingDir": "/w"},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    archive = tmp_path / "saved.tar"
    manifest = json.dumps([{"Config": "cfg.json", "Layers": ["abc/layer.tar"]}]).encode()
    with tarfile.open(archive, "w") as t:
        for name, blob in [("abc/layer.tar", layer.getvalue()), ("cfg.json", config), ("manifest.json", manifest)]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    img = ImageStore(tmp_path / "cache").resolve(str(archive))
    assert (img.rootfs / "hello.sh").stat().st_mode & 0o111
    assert (img.config.cmd, img.config.env, img.config.working_dir) == (("/hello.sh",), ("A=1",), "/w")


def test_bundle_directory_is_used_in_place(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"},
                                                    "process": {"args": ["true"], "cwd": "/"}}))
    img = ImageStore(tmp_path / "cache").resolve(str(bundle))
    assert img.rootfs == (bundle / "rootfs").resolve() and img.config.cmd == ("true",)
    assert img.bundle_spec is not None


@pytest.mark.parametrize("ref", ["no-such-image", "/nonexistent/path.tar"])
def test_unknown_image_is_a_clear_error(tmp_path: Path, ref: str) -> None:
    with pytest.raises(ImageError, match="unknown image"):
        ImageStore(tmp_path).resolve(ref)


def test_garbage_archive_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="not an image archive") as info:
        ImageStore(tmp_path).resolve(str(bad))
    assert "\n" not in str(info.value), "one line: tarfile lists each compression it tried on a line of its own"


def test_docker_save_with_linked_layers(tmp_path: Path) -> None:
    # docker save (before 25) links identical layers: b/layer.tar -> ../a/layer.tar
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as lt:
        info = tarfile.TarInfo("same")
        info.size = 1
        lt.addfile(info, io.BytesIO(b"1"))
    diff_id = "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]}}).encode()
    manifest = json.dumps([{"Config": "c.json", "Layers": ["a/layer.tar", "b/layer.tar"]}]).encode()
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as t:
        for name, blob in [("a/layer.tar", layer.getvalue()), ("c.json", config), ("manifest.json", manifest)]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
        link = tarfile.TarInfo("b/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../a/layer.tar"
        t.addfile(link)
    img = ImageStore(tmp_path / "cache").resolve(str(archive))
    assert (img.rootfs / "same").read_bytes() == b"1"
    assert img.rootfs.parent.name.startswith("docker-sha256-")


def test_a_killed_unpacks_staging_is_removed_later(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "cache")
    old, fresh = store.images_dir / ".staging-old", store.images_dir / ".staging-fresh"
    for d in (old, fresh):
        (d / "rootfs/deep/er").mkdir(parents=True)
    os.utime(old, (0, 0))
    store.resolve("busybox")
    assert not old.exists() and fresh.exists()  # a fresh one may belong to an unpack running now
