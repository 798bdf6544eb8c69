"""`pykata collect`: the bug-report tarball has each part, the logs of a real sandbox, and no secret."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pykata
from pykata.config import load_config_file

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")
SECRETS = ("hunter2-registry-password", "tok-3f9a1c-identity")
CONTAINERD = f"""version = 2
[plugins."io.containerd.grpc.v1.cri".registry.configs."registry.example".auth]
  username = "bob"
  password = "{SECRETS[0]}"
  identitytoken = "{SECRETS[1]}"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]
  runtime_type = "io.containerd.pykata.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata.auth]
  password = "{SECRETS[0]}"
"""


@pytest.fixture
def private() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pkcol", dir="/tmp"))
    (d / "configuration.toml").write_text(f'# collect test\n[runtime]\nruntime_dir = "{d}/run"\n')
    (d / "containerd.toml").write_text(CONTAINERD)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.vm
async def test_collect_has_every_part_and_no_secret(private: Path) -> None:
    env = {**os.environ, "PYKATA_CONFIG": str(private / "configuration.toml")}
    out = private / "bundle.tar.gz"
    async with pykata.AsyncSandbox(image="busybox", config=load_config_file(private / "configuration.toml")) as sb:
        p = await asyncio.to_thread(subprocess.run, [PYKATA, "collect", "--output", str(out), "--containerd-config",
                                                     str(private / "containerd.toml")],
                                    capture_output=True, env=env, timeout=300)
        sid = sb.id
    assert p.returncode == 0, p.stderr
    assert out.stat().st_mode & 0o077 == 0  # logs may be sensitive: the admin's only
    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    for part in ("versions.json", "check.json", "config/effective.json", "config/configuration.toml",
                 "sandboxes.json", "containerd/pykata.toml", "host.json", f"logs/{sid}/console.log",
                 f"logs/{sid}/qemu.log"):
        assert part in files, sorted(files)
    assert json.loads(files["versions.json"])["pykata"] == pykata.__version__
    assert "qemu" in json.loads(files["versions.json"])["qemu"].lower()
    assert json.loads(files["check.json"])["checks"]
    assert json.loads(files["config/effective.json"])["runtime"]["runtime_dir"] == f"{private}/run"
    assert b"# collect test" in files["config/configuration.toml"]
    assert [s["id"] for s in json.loads(files["sandboxes.json"])] == [sid]
    snippet = files["containerd/pykata.toml"]
    assert b"runtimes.pykata]" in snippet and b"<redacted>" in snippet and b"registry.example" not in snippet
    assert "cgroup_controllers" in json.loads(files["host.json"])
    assert files[f"logs/{sid}/console.log"]
    for data in files.values():
        for secret in SECRETS:
            assert secret.encode() not in data


def test_collect_to_an_unwritable_place_is_one_clear_line(private: Path) -> None:
    env = {**os.environ, "PYKATA_CONFIG": str(private / "configuration.toml")}
    p = subprocess.run([PYKATA, "collect", "--output", "/nonexistent-dir/x.tar.gz"], capture_output=True, env=env,
                       timeout=300)
    assert p.returncode == 1 and b"nonexistent-dir" in p.stderr and b"Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        b"pykata: collect: --output: cannot write /nonexistent-dir/x.tar.gz: No such file or directory"]
