"""`pykata image save`: the embedded busybox as an OCI archive that containerd (`ctr images import`) and
`pykata run` take, so the README's ctr example runs on a host without a registry."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from pykata.cli.image import _print_human
from pykata.config import load_config
from pykata.images import ImageStore
from tests.shim.harness import Containerd, missing_prerequisites

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")


def test_save_writes_an_archive_that_ctr_and_pykata_import(tmp_path: Path) -> None:
    out = tmp_path / "busybox.tar"
    p = subprocess.run([PYKATA, "image", "save", "busybox", "-o", str(out), "--name", "example.org/bb:1"],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert b"ctr images import --base-name example.org/bb" in p.stdout
    assert not [f for f in tmp_path.iterdir() if f != out]  # no temporary file left beside it
    with tarfile.open(out) as t:
        index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "example.org/bb:1"
    config = load_config()
    image = ImageStore(config.runtime.cache_path, config.image).resolve(str(out))
    assert (image.rootfs / "bin" / "sh").exists() and image.config.cmd == ("sh",)
    if missing_prerequisites() is None:
        ctd = Containerd(tmp_path / "ctd")
        ctd.start()
        try:
            ctd.ctr("images", "import", "--base-name", "example.org/bb", str(out))
            assert b"example.org/bb:1" in ctd.ctr("images", "ls", "-q").stdout
        finally:
            ctd.stop()


def test_save_streams_a_layer_bigger_than_its_memory(tmp_path: Path) -> None:
    """The layer was built in memory (a BytesIO, then a copy of it): a 160 MiB file took ~1.2x that of RSS.
    Now it is streamed through a temporary file: peak RSS stays well under the layer's size."""
    import os

    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "process": {"args": ["/bin/true"]},
                                                    "root": {"path": "rootfs"}}))
    big = 160 << 20
    with open(bundle / "rootfs" / "big", "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(big)  # sparse beyond its first MiB: cheap to make, read as 160 MiB all the same
    out = tmp_path / "big.tar"
    # The command's own peak: VmHWM of its process after exec (getrusage's maxrss counts the forking
    # parent's pages too: this test process's, ~100 MiB after other tests)
    measure = ("import sys\nfrom pykata.cli.main import cli\nsys.argv = ['pykata', *sys.argv[1:]]\n"
               "try:\n    cli()\nexcept SystemExit as e:\n    code = e.code\n"
               "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]\n"
               "print('PEAK', hwm, file=sys.stderr)\nsys.exit(code)\n")
    p = subprocess.run([str(Path(PYKATA).parent / "python"), "-c", measure, "image", "save", str(bundle), "-o",
                        str(out)], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    peak = int(p.stderr.decode().rsplit("PEAK ", 1)[1].split()[0]) << 10
    print(f"pykata image save of a {big >> 20} MiB layer: peak RSS {peak / 2**20:.1f} MiB")
    assert peak < big // 2, f"peak RSS {peak >> 20} MiB for a {big >> 20} MiB layer"
    with tarfile.open(out) as t:
        index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads(t.extractfile(f"blobs/sha256/{manifest_digest}").read())  # type: ignore[union-attr]
        layer = manifest["layers"][0]
        member = t.getmember(f"blobs/sha256/{layer['digest'].split(':')[1]}")
        assert member.size == layer["size"] > big
        import hashlib

        digest = hashlib.sha256()
        blob = t.extractfile(member)
        assert blob is not None
        while chunk := blob.read(1 << 20):
            digest.update(chunk)
        assert "sha256:" + digest.hexdigest() == layer["digest"]  # the streamed digest is the layer's
    assert sorted(f.name for f in tmp_path.iterdir()) == ["big.tar", "bundle"]  # no temporary file left


def test_save_names_the_bad_argument(tmp_path: Path) -> None:
    for args, needle in ((["no-such-image", "-o", str(tmp_path / "x.tar")], b"no-such-image"),
                         (["busybox", "-o", str(tmp_path / "no" / "x.tar")], b"--output"),
                         (["busybox", "-o", str(tmp_path / "x.tar"), "--name", "a b"], b"--name")):
        p = subprocess.run([PYKATA, "image", "save", *args], capture_output=True, timeout=120)
        assert p.returncode != 0 and needle in p.stderr and b"Traceback" not in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


def test_image_info_shortens_a_long_list_of_other_builds(capsys: pytest.CaptureFixture[str]) -> None:
    """A busy cache keeps every build of the last 12 hours: `image info` printed 100+ keys on one line."""
    others = [f"{i:020x}" for i in range(106)]
    _print_human({"cache_dir": "/c", "kernel": None, "rootfs": None, "other_kernels": others[:2],
                  "other_rootfs": others})
    out = capsys.readouterr().out
    assert f"other kernels in the cache: {others[0]}, {others[1]}\n" in out
    assert f"other rootfs in the cache: 106: {', '.join(others[:5])}, ... (--json lists all)" in out
    assert others[5] not in out
