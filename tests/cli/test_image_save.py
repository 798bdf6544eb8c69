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
