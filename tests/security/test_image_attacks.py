"""Images are untrusted: each attack on the image store is performed here and must fail with a clear
error, leaving the cache exactly as it was (no staging directory, nothing under any digest) and the
host directory the attack aims at untouched. The malicious archives are made with tarfile."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata.config.schema import ImageSection
from pykata.images import BlobError, ImageError, ImageLimitError, ImageStore, LayerError, layers
from tests.security.imagekit import (
    Entry,
    archive_of,
    digest,
    directory,
    entry,
    fast_dir,
    file,
    gz,
    hardlink,
    layer,
    oci_image,
    symlink,
    tree,
)

THROUGH_SYMLINK = "is a symlink: entries are never written through symlinks"


@dataclass
class Scene:
    """A cache, a host directory an attack aims at (with a 'passwd' in it) and a place for images."""

    base: Path
    cache: Path
    host: Path
    images: Path
    limits: ImageSection

    def store(self) -> ImageStore:
        return ImageStore(self.cache, self.limits)

    def image(self, layers: list[bytes], name: str = "img", **kw: object) -> Path:
        path, _ = oci_image(self.images / name, layers, **kw)  # type: ignore[arg-type]
        return path

    def refused(self, ref: Path | str, error: type[ImageError], match: str) -> ImageError:
        """Resolve `ref`, expect `error` matching `match`, and check that nothing changed."""
        cache_before, host_before = tree(self.cache), tree(self.host)
        with pytest.raises(error, match=match) as info:
            self.store().resolve(str(ref))
        assert str(ref) in str(info.value), "the error names the image"
        assert tree(self.cache) == cache_before, "the cache changed"
        assert not list((self.cache / "images").glob(".staging-*")), "a staging directory was left"
        assert tree(self.host) == host_before, "the host directory changed"
        assert not (self.base / "evil").exists()
        return info.value


@pytest.fixture(autouse=True, params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every attack runs twice: parents found with openat2 and with the O_NOFOLLOW walk older kernels get."""
    if request.param == "walk":
        monkeypatch.setattr(layers, "_OPENAT2", None)
    elif layers._OPENAT2 is None:
        pytest.skip("this kernel has no openat2 (Linux < 5.6): the walk variant covers it")
    return str(request.param)


@pytest.fixture
def scene() -> Iterator[Scene]:
    with fast_dir("pykata-imagesec-") as base:
        host = base / "host"
        (host / "dir").mkdir(parents=True)
        (host / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (base / "images").mkdir()
        s = Scene(base, base / "cache", host, base / "images", ImageSection())
        # a good image in the cache first: attacks must not change it either
        s.store().resolve(str(s.image([layer([file("etc/hostname", b"good\n")])], "good")))
        yield s


# ---- digests ------------------------------------------------------------------------------------------

def test_layer_digest_mismatch_does_not_poison_the_cache(scene: Scene) -> None:
    # The victim's manifest and config are public; the attacker ships them verbatim with an evil
    # layer under the victim layer's digest, so that the victim's digest would name the evil rootfs.
    victim_layer = layer([file("bin/sh", b"the real shell")])
    evil = layer([file("bin/sh", b"#!/bin/sh\nsteal\n")])
    path, desc = oci_image(scene.images / "victim", [victim_layer],
                           overrides={digest(victim_layer): evil})
    err = scene.refused(path, BlobError, "does not match its digest|descriptor says")
    assert isinstance(err, BlobError) and err.digest == digest(victim_layer)
    assert "layer 1/1" in str(err)
    # nothing is cached under the victim's manifest digest: the real image still unpacks correctly
    path.joinpath("blobs/sha256", digest(victim_layer).split(":")[1]).write_bytes(victim_layer)
    img = scene.store().resolve(str(path))
    assert (img.rootfs / "bin/sh").read_bytes() == b"the real shell"
    assert img.rootfs.parent.name == "oci-" + str(desc["digest"]).replace(":", "-")


def test_manifest_claiming_another_images_digest_is_refused(scene: Scene) -> None:
    good = next((scene.cache / "images").glob("oci-sha256-*"))
    claimed = "sha256:" + good.name.removeprefix("oci-sha256-")
    path, _ = oci_image(scene.images / "liar", [layer([file("x")])])
    index = json.loads((path / "index.json").read_text())
    real = index["manifests"][0]["digest"]
    index["manifests"][0]["digest"] = claimed  # the index names the good image's manifest digest...
    (path / "index.json").write_text(json.dumps(index))
    # ...and the attacker's manifest is stored under that digest
    (path / "blobs/sha256" / real.split(":")[1]).rename(path / "blobs/sha256" / claimed.split(":")[1])
    err = scene.refused(path, BlobError, "does not match its digest")
    assert isinstance(err, BlobError) and err.digest == claimed


def test_config_digest_mismatch(scene: Scene) -> None:
    path, desc = oci_image(scene.images / "cfg", [layer([file("x")])], cmd=("sh",))
    manifest = json.loads((path / "blobs/sha256" / str(desc["digest"]).split(":")[1]).read_bytes())
    config_file = path / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]
    config_file.write_bytes(config_file.read_bytes().replace(b'["sh"]', b'["rm"]'))  # same size
    err = scene.refused(path, BlobError, "does not match its digest")
    assert isinstance(err, BlobError) and err.digest == manifest["config"]["digest"]


@pytest.mark.parametrize("declared", [-1, +1], ids=["declared-shorter", "declared-longer"])
def test_layer_size_mismatch(scene: Scene, declared: int) -> None:
    data = layer([file("etc/x", b"1" * 5000)])
    path = scene.image([data], layer_sizes=[len(data) + declared])
    err = scene.refused(path, BlobError, "longer than the|bytes, but its descriptor says")
    assert isinstance(err, BlobError) and err.digest == digest(data)


def test_diff_id_mismatch(scene: Scene) -> None:
    # the layer blob is what the manifest says, but not what the (signed-over) config promises
    path = scene.image([gz(layer([file("etc/x")]))], diff_ids=[digest(b"something else")])
    scene.refused(path, BlobError, "rootfs.diff_ids")


def test_docker_save_without_diff_ids_is_refused(scene: Scene) -> None:
    # docker save's manifest.json has no digests: the config's diff_ids are what make it verifiable
    archive = scene.images / "saved.tar"
    with tarfile.open(archive, "w") as t:
        for name, data in [("l/layer.tar", layer([file("x")])), ("c.json", b'{"config": {}}'),
                           ("manifest.json", b'[{"Config": "c.json", "Layers": ["l/layer.tar"]}]')]:
            t.addfile(file(name, data)[0], io.BytesIO(data))
    scene.refused(archive, ImageError, "rootfs.diff_ids must list one digest per layer")


def test_unsupported_digest_is_refused(scene: Scene) -> None:
    path = scene.image([layer([file("x")])])
    index = json.loads((path / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (path / "index.json").write_text(json.dumps(index))
    scene.refused(path, BlobError, "not a sha256 or sha512 digest")


# ---- whiteouts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("entries, match", [
    (lambda h: [file(".wh..", b"")], "must name an entry of its directory"),
    (lambda h: [file(".wh...", b"")], "must name an entry of its directory"),  # emptied the staging dir
    (lambda h: [directory("etc"), file("etc/.wh...", b"")], "must name an entry of its directory"),
    (lambda h: [file(".wh.", b"")], "must name an entry of its directory"),
    (lambda h: [file(".wh..wh.plnk", b"")], "unknown special whiteout"),
    (lambda h: [file("a/.wh.b/c", b"")], "whiteout prefix"),
    (lambda h: [symlink("h", h), file("h/.wh.passwd", b"")], "symlink"),
    (lambda h: [symlink("h", h), file("h/.wh..wh..opq", b"")], "symlink"),
    (lambda h: [symlink("h", "../../../../host"), file("h/.wh.passwd", b"")], "symlink"),
    (lambda h: [file("../.wh.passwd", b"")], r"contains '\.\.'"),
], ids=["dot", "dotdot", "nested-dotdot", "empty", "unknown-special", "whiteout-dir", "via-abs-symlink",
        "opaque-via-symlink", "via-rel-symlink", "dotdot-path"])
def test_whiteout_escape(scene: Scene, entries: Callable[[str], list[Entry]], match: str) -> None:
    path = scene.image([layer([file("etc/keep", b"k")]), layer(entries(str(scene.host)))])
    err = scene.refused(path, LayerError, match)
    assert "layer 2/2" in str(err)


def test_whiteouts_follow_the_oci_spec(scene: Scene) -> None:
    # not an attack: what whiteouts may do (lower layers only; opaque keeps this layer's own entries)
    lower = layer([file("a/old", b"1"), file("a/sub/old", b"2"), file("b", b"3"), file("c/d", b"4")])
    upper = layer([file("a/new", b"5"), file("a/sub/new", b"6"), file("a/.wh..wh..opq", b""),
                   file(".wh.b", b""), file("c/.wh.d", b""), file(".wh.missing", b""),
                   file("e", b"7"), file(".wh.e", b"")])
    rootfs = scene.store().resolve(str(scene.image([lower, upper]))).rootfs
    assert sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*")) == [
        "a", "a/new", "a/sub", "a/sub/new", "c", "e"]


# ---- entries that try to leave the root --------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./../evil", "a/b/../../../../evil"])
def test_tar_with_dotdot(scene: Scene, name: str) -> None:
    scene.refused(scene.image([layer([file(name)])]), LayerError, r"contains '\.\.'")


def test_absolute_symlink_then_file_through_it(scene: Scene) -> None:
    entries = [symlink("etc", str(scene.host)), file("etc/passwd", b"root::0:0::/:/bin/sh\n")]
    scene.refused(scene.image([layer(entries)]), LayerError, THROUGH_SYMLINK)


def test_absolute_names_stay_inside_the_root(scene: Scene) -> None:
    # Docker, containerd and GNU tar take absolute names relative to the root: so do we
    evil = str(scene.base / "evil")
    img = scene.store().resolve(str(scene.image([layer([file(evil, b"inside")])])))
    assert (img.rootfs / evil.lstrip("/")).read_bytes() == b"inside"
    assert not Path(evil).exists()


@pytest.mark.parametrize("entries", [
    lambda h: [symlink("a", "b"), symlink("b", h), file("a/passwd")],
    lambda h: [symlink("a", "b/c"), directory("b"), symlink("b/c", "../../../../../host"), file("a/dir/x")],
    lambda h: [symlink("a", "."), symlink("b", "a/../../../../../host"), file("b/x")],
], ids=["two-hops", "via-directory", "dot-then-dotdot"])
def test_chained_symlinks(scene: Scene, entries: Callable[[str], list[Entry]]) -> None:
    scene.refused(scene.image([layer(entries(str(scene.host)))]), LayerError, THROUGH_SYMLINK)


def test_symlink_replacing_a_lower_directory(scene: Scene) -> None:
    lower = layer([directory("d"), file("d/x")])
    upper = layer([symlink("d", str(scene.host)), file("d/passwd", b"pwned")])
    scene.refused(scene.image([lower, upper]), LayerError, THROUGH_SYMLINK)


@pytest.mark.parametrize("target", ["HOST/passwd", "../../../../host/passwd", "s/passwd"],
                         ids=["absolute", "dotdot", "through-symlink"])
def test_hardlink_to_a_host_file(scene: Scene, target: str) -> None:
    entries = [symlink("s", str(scene.host)), hardlink("h", target.replace("HOST", str(scene.host)))]
    nlink = os.stat(scene.host / "passwd").st_nlink
    err = scene.refused(scene.image([layer(entries)]), LayerError,
                        r"does not exist in the image|contains '\.\.'|is a symlink")
    assert isinstance(err, LayerError) and err.member == "h"
    assert os.stat(scene.host / "passwd").st_nlink == nlink


@pytest.mark.parametrize("kind, major, minor", [(tarfile.CHRTYPE, 1, 3), (tarfile.BLKTYPE, 8, 0),
                                                (tarfile.CHRTYPE, 0, 0)], ids=["null", "sda", "overlay-whiteout"])
def test_device_nodes_are_refused(scene: Scene, kind: bytes, major: int, minor: int) -> None:
    node = entry("dev/disk", kind, mode=0o666, devmajor=major, devminor=minor)
    err = scene.refused(scene.image([layer([directory("dev"), node])]), LayerError, "device node")
    assert f"{major}:{minor}" in str(err) and "host device" in str(err)


def test_setuid_bits_are_kept_as_containerd_does_but_hosts_users_cannot_reach_them(scene: Scene) -> None:
    su = file("bin/su", b"\x7fELF", mode=0o4755)
    su[0].uid = su[0].gid = 0
    img = scene.store().resolve(str(scene.image([layer([su])])))
    assert (img.rootfs / "bin/su").stat().st_mode & 0o7777 == 0o4755
    assert (scene.cache / "images").stat().st_mode & 0o777 == 0o700


# ---- caps ---------------------------------------------------------------------------------------------

def _bomb_member(size: int) -> bytes:
    """A tar with one file of `size` zero bytes, gzipped by streaming (never all in memory)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as g:
        info = tarfile.TarInfo("zeros")
        info.size = size
        g.write(info.tobuf(format=tarfile.PAX_FORMAT))
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            g.write(chunk)
        g.write(bytes(1024))
    return out.getvalue()


def _many_files_bomb(count: int, size: int) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as g, \
            tarfile.open(fileobj=g, mode="w|", format=tarfile.PAX_FORMAT) as t:  # type: ignore[call-overload]
        data = bytes(size)
        for i in range(count):
            t.addfile(file(f"f{i}", data)[0], io.BytesIO(data))
    return out.getvalue()


def _trailing_bomb(size: int) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as g:
        g.write(layer([file("small")]))
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            g.write(chunk)  # after the end of the archive: still uncompressed bytes to read and hash
    return out.getvalue()


@pytest.mark.parametrize("bomb", ["one-file", "many-files", "after-the-end"])
def test_gzip_bomb(scene: Scene, bomb: str) -> None:
    scene.limits = dataclasses.replace(scene.limits, max_unpacked_mib=8)
    blob = {"one-file": lambda: _bomb_member(64 << 20), "many-files": lambda: _many_files_bomb(40, 1 << 20),
            "after-the-end": lambda: _trailing_bomb(64 << 20)}[bomb]()
    assert len(blob) < 1 << 20  # a small download...
    path = scene.image([blob], diff_ids=[digest(b"unknown")])
    err = scene.refused(path, ImageLimitError, "exceeds image.max_unpacked_mib = 8")
    assert isinstance(err, ImageLimitError) and err.limit == "image.max_unpacked_mib"


def test_gzip_bomb_at_the_default_cap_stops_before_writing(scene: Scene) -> None:
    # the default cap (4 GiB): a file that claims more is refused from its header, nothing written
    info = tarfile.TarInfo("huge")
    info.size = (ImageSection().max_unpacked_mib << 20) + 1
    blob = gz(info.tobuf(format=tarfile.PAX_FORMAT))
    path = scene.image([blob], diff_ids=[digest(b"unknown")])
    scene.refused(path, ImageLimitError, "declares .* bytes, more than is left: exceeds image.max_unpacked_mib")


def test_free_space_reserve(scene: Scene) -> None:
    st = os.statvfs(scene.base)
    scene.limits = dataclasses.replace(scene.limits, min_free_mib=(st.f_bavail * st.f_frsize >> 20) + 1)
    scene.refused(scene.image([layer([file("x")])]), ImageLimitError, "exceeds image.min_free_mib")


@pytest.mark.slow
@pytest.mark.parametrize("resolver", ["openat2"], indirect=True)  # 100k files once is enough
def test_100k_entries(scene: Scene) -> None:
    limit = ImageSection().max_entries  # the default
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for i in range(limit + 1):
            t.addfile(tarfile.TarInfo(f"d{i // 1000}/f{i}"))
    err = scene.refused(scene.image([gz(buf.getvalue())]), ImageLimitError,
                        f"more than {limit} entries: exceeds image.max_entries = {limit}")
    assert isinstance(err, ImageLimitError) and err.limit == "image.max_entries"


def test_implied_directories_count_as_entries(scene: Scene) -> None:
    # one entry 'a/a/.../f' makes every directory above it: inodes an entry cap must see
    scene.limits = dataclasses.replace(scene.limits, max_entries=100)
    scene.refused(scene.image([layer([file("a/" * 150 + "f")])]), ImageLimitError,
                  "more than 100 entries: exceeds image.max_entries")


def test_too_many_layers(scene: Scene) -> None:
    scene.limits = dataclasses.replace(scene.limits, max_layers=3)
    path = scene.image([layer([file(f"f{i}")]) for i in range(4)])
    scene.refused(path, ImageLimitError, "4 layers: exceeds image.max_layers = 3")


def _pax(name: str, data: bytes = b"x", **headers: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = headers
    return layer([(info, data)])


@pytest.mark.parametrize("blob, error, match", [
    (_pax("x", comment="a" * (2 << 20)), ImageLimitError, "exceeds image.max_pax_header_bytes"),
    (_pax("a/" * 3000 + "f"), ImageLimitError, "path of 6001 bytes: exceeds image.max_path_length"),
    (layer([file("a/" * 3000 + "f")], fmt=tarfile.GNU_FORMAT), ImageLimitError, "image.max_path_length"),
    (layer([file("x" * 256)]), LayerError, "longer than 255 bytes"),
    (layer([symlink("s", "t" * 5000)]), ImageLimitError, "link target of 5000 bytes"),
    (layer([file("x" * 200 + "/" + "y" * 2000)], fmt=tarfile.GNU_FORMAT), LayerError, "longer than 255"),
], ids=["pax-2MiB", "pax-long-path", "gnu-longname", "long-component", "long-symlink", "gnu-long-component"])
def test_long_paths_and_pax_headers(scene: Scene, blob: bytes, error: type[ImageError], match: str) -> None:
    scene.refused(scene.image([blob]), error, match)


def test_global_pax_headers_do_not_pile_up(scene: Scene) -> None:
    buf = io.BytesIO()
    for i in range(4):  # four global headers of 400 KiB each: more than 1 MiB in all
        g = tarfile.TarInfo("g")
        g.type = tarfile.XGLTYPE
        payload = tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
            {f"k{i}": "v" * (400 << 10)}, tarfile.XGLTYPE, "utf-8")
        buf.write(payload)
        buf.write(file(f"f{i}")[0].tobuf(format=tarfile.USTAR_FORMAT) + b"x".ljust(512, b"\0"))
    buf.write(bytes(1024))
    scene.refused(scene.image([buf.getvalue()]), ImageLimitError, "global pax headers")


def test_chain_of_pax_headers(scene: Scene) -> None:
    # tarfile recurses once per extended header: a long chain would end in RecursionError
    buf = io.BytesIO()
    for _ in range(5000):
        buf.write(tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
            {"comment": "c"}, tarfile.XHDTYPE, "utf-8"))
    buf.write(file("f")[0].tobuf(format=tarfile.USTAR_FORMAT) + b"x".ljust(512, b"\0") + bytes(1024))
    scene.refused(scene.image([buf.getvalue()]), LayerError, "extended header records in a row")


def test_sparse_files_are_refused(scene: Scene) -> None:
    info = tarfile.TarInfo("sparse")
    info.size = 1
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(1 << 40),
                        "GNU.sparse.name": "sparse"}
    scene.refused(scene.image([layer([(info, b"1")])]), LayerError, "sparse files are not supported")


def test_archive_symlink_loop(scene: Scene) -> None:
    # `docker save` links identical layers: a loop of links in the archive must end
    archive = scene.images / "loop.tar"
    with tarfile.open(archive, "w") as t:
        for name, target in [("a/layer.tar", "../b/layer.tar"), ("b/layer.tar", "../a/layer.tar")]:
            t.addfile(symlink(name, target))
        config = json.dumps({"rootfs": {"diff_ids": [digest(b"")]}}).encode()
        manifest = b'[{"Config": "c.json", "Layers": ["a/layer.tar"]}]'
        for name, data in [("c.json", config), ("manifest.json", manifest)]:
            t.addfile(file(name, data)[0], io.BytesIO(data))
    scene.refused(archive, ImageError, "links in a row")


def test_layout_blob_symlink_is_not_followed(scene: Scene) -> None:
    path = scene.image([layer([file("x")])])
    blob = next(p for p in (path / "blobs/sha256").iterdir() if p.stat().st_size > 1000)
    blob.unlink()
    blob.symlink_to(scene.host / "passwd")
    scene.refused(path, ImageError, "symlinks are not followed")


@pytest.mark.parametrize("compress", [gz, lambda data: data], ids=["tar.gz", "tar"])
@pytest.mark.parametrize("keep", [0.25, 0.6])
def test_truncated_archive(scene: Scene, compress: Callable[[bytes], bytes], keep: float) -> None:
    layout = scene.image([gz(layer([file("etc/x", os.urandom(20000))]))])
    data = compress(archive_of(layout, scene.images / "whole.tar").read_bytes())
    cut = scene.images / "cut.tar"
    cut.write_bytes(data[:int(len(data) * keep)])
    scene.refused(cut, ImageError, "not an image archive|cannot be read from the archive|missing from the "
                                   "archive|unexpected end of data")


def test_oci_archive_attacks_fail_the_same_way(scene: Scene) -> None:
    layout = scene.image([layer([symlink("etc", str(scene.host)), file("etc/passwd")])])
    scene.refused(archive_of(layout, scene.images / "evil.tar"), LayerError, THROUGH_SYMLINK)


# ---- the image's process ------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "match"), [
    ({"Cmd": ["sh"], "WorkingDir": "app"}, r"config\.WorkingDir 'app' is not an absolute path"),
    ({"Cmd": ["sh"], "Env": [f"V{i}=" + "x" * 100_000 for i in range(8)]}, r"Entrypoint, Cmd and Env hold \d+ bytes"),
    ({"Cmd": ["y" * 140_000]}, r"config\.Cmd\[0\] is over 131072 bytes"),
    ({"Cmd": ["sh"], "Env": [f"V{i}=" for i in range(5000)]}, r"config\.Env has 5000 entries, over 4096"),
    ({"Entrypoint": ["x"] * 5000}, r"config\.Entrypoint has 5000 entries"),
    ({"Cmd": ["sh"], "Env": ["PATH=/bin", "=x"]}, r"config\.Env\[1\] '=x' is not KEY=value"),
])
def test_image_process_the_guest_would_refuse_fails_naming_the_field(scene: Scene, config: dict[str, object],
                                                                     match: str) -> None:
    """An image whose config makes a process the agent refuses (a relative cwd, arguments or
    environment over its limits) failed only in the guest, after a VM booted, naming the agent's
    oci_spec_json; now reading the image fails, naming the image config's field."""
    scene.refused(scene.image([layer([file("a")])], config=config), ImageError, match)


def test_image_working_dir_is_cleaned_as_docker_does(scene: Scene) -> None:
    img = scene.store().resolve(str(scene.image([layer([file("a")])], config={"WorkingDir": "/../../etc/./x/.."})))
    assert img.config.working_dir == "/etc"
