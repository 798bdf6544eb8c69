"""Differential tests: the same bundle run by `runc run` on the host and by `pykata run` in a VM must
give the same stdout, stderr and exit status."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata.images import ImageStore
from pykata.sandbox import Volume, build_spec
from pykata.sandbox.ocispec import add_volumes
from tests.dockerstatus import docker_exec_status

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")
pytestmark = [pytest.mark.vm]

BIG = 50 * 1024 * 1024


@dataclass
class Case:
    name: str
    args: list[str]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: tuple[int, int] = (0, 0)
    stdin: bytes | None = None
    volume_ro: bool = False
    digest_stdout: bool = False


CASES = [
    Case("echo", ["echo", "hello world"]),
    Case("exit0", ["true"]),
    Case("exit1", ["false"]),
    Case("exit7", ["sh", "-c", "echo out; echo err >&2; exit 7"]),
    Case("exit137", ["sh", "-c", "kill -9 $$"]),
    Case("sigterm", ["sh", "-c", "kill -TERM $$"]),
    Case("env", ["sh", "-c", "echo $FOO-$BAR"], env=("FOO=foo", "BAR=bar baz")),
    # nothing of the runtime's own environment (the agent runs crun with LD_LIBRARY_PATH) reaches it
    Case("whole-env", ["sh", "-c", "env | sort; tr '\\0' '\\n' < /proc/1/environ | sort"], env=("FOO=foo",)),
    Case("cwd", ["pwd"], cwd="/tmp"),
    Case("user", ["id"], user=(1000, 1000)),
    Case("hostname", ["hostname"]),
    Case("stdin", ["sh", "-c", "cat; echo done"], stdin=b"line one\nline two\n"),
    Case("big-output", ["sh", "-c", f"head -c {BIG} /dev/zero | tr '\\0' 'x'"], digest_stdout=True),
    Case("ro-volume", ["sh", "-c", "cat /data/file; echo new > /data/file"], volume_ro=True),
]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ImageStore(tmp_path_factory.mktemp("cache")).resolve("busybox").rootfs


def _bundle(tmp: Path, rootfs: Path, case: Case, volume: Path) -> Path:
    bundle = tmp / "bundle"
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    spec = build_spec(case.args, env=["PATH=/bin:/sbin:/usr/bin", *case.env], cwd=case.cwd, user=case.user,
                      hostname="differential")
    spec["linux"]["resources"] = {}
    if case.volume_ro:
        spec = add_volumes(spec, [Volume(volume, "/data", readonly=True)])
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _run(argv: list[str], stdin: bytes | None, cwd: Path) -> tuple[int, bytes, bytes]:
    p = subprocess.run(argv, input=stdin or b"", capture_output=True, cwd=cwd, timeout=180)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_as_runc(case: Case, rootfs: Path, tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "file").write_text("original\n")
    bundle = _bundle(tmp_path, rootfs, case, volume)
    cid = f"diff-{uuid.uuid4().hex[:8]}"
    try:
        runc = _run(["runc", "run", "--bundle", str(bundle), cid], case.stdin, tmp_path)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    pyk = _run([PYKATA, "run", "--rm", *(["-i"] if case.stdin else []), str(bundle)], case.stdin, tmp_path)
    if case.digest_stdout:
        assert len(runc[1]) == BIG
        runc = (runc[0], hashlib.sha256(runc[1]).digest(), runc[2])
        pyk = (pyk[0], hashlib.sha256(pyk[1]).digest(), pyk[2])
    assert pyk == runc
    if case.volume_ro:
        assert runc[0] != 0 and b"Read-only file system" in runc[2]
        assert (volume / "file").read_text() == "original\n"


# (name, runc exec / pykata exec options, argv, what the message names)
EXEC_FAILURES = [
    ("not-on-path", [], ["no-such-cmd"], "no-such-cmd"),
    ("missing-path", [], ["/bin/nope"], "/bin/nope"),
    ("not-executable", [], ["/etc/passwd"], "/etc/passwd"),
    ("directory", [], ["/etc"], "/etc"),
    ("missing-cwd", ["--cwd", "/nonexistent"], ["true"], "/nonexistent"),
    ("cwd-is-a-file", ["--cwd", "/etc/passwd"], ["true"], "/etc/passwd"),
]


def test_a_failed_exec_exits_as_docker_exec_does_under_runc(rootfs: Path, tmp_path: Path) -> None:
    """`pykata exec` of a command that cannot start exits with the status `docker exec` gives under runc
    (moby's reading of runc's message, tests/dockerstatus.py: 127 not found, 126 not invocable, 127 for a
    cwd that is a file), with one `pykata:` line naming the program or cwd; never a Python error."""
    bundle = _bundle(tmp_path, rootfs, Case("sleep", ["sleep", "100000"]), tmp_path)
    cid, name = f"diff-{uuid.uuid4().hex[:8]}", f"execfail-{uuid.uuid4().hex[:6]}"
    runc: dict[str, str] = {}
    try:
        subprocess.run(["runc", "run", "-d", "--bundle", str(bundle), cid], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        for case, opts, argv, _names in EXEC_FAILURES:
            p = subprocess.run(["runc", "exec", *opts, cid, *argv], capture_output=True, timeout=60)
            assert p.returncode != 0, case
            runc[case] = p.stderr.decode(errors="replace")
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True, timeout=60)
    try:
        started = subprocess.run([PYKATA, "run", "-d", "--name", name, "busybox", "sleep", "100000"],
                                 capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        assert started.returncode == 0, started.stderr
        for case, opts, argv, names in EXEC_FAILURES:
            pyk_opts = ["-w", opts[1]] if opts else []
            p = subprocess.run([PYKATA, "exec", *pyk_opts, name, *argv], capture_output=True, timeout=120,
                               stdin=subprocess.DEVNULL)
            err = p.stderr.decode(errors="replace")
            assert p.returncode == docker_exec_status(runc[case], argv[0]), (case, runc[case], err)
            assert (p.stdout, len(err.splitlines())) == (b"", 1), (case, err)
            assert err.startswith("pykata: ") and names in err, (case, err)
            assert "Traceback" not in err and "invalid literal" not in err, err
        after = subprocess.run([PYKATA, "exec", name, "echo", "still-here"], capture_output=True, timeout=120,
                               stdin=subprocess.DEVNULL)
        assert (after.returncode, after.stdout) == (0, b"still-here\n"), after.stderr
    finally:
        subprocess.run([PYKATA, "rm", "-f", name], capture_output=True, timeout=120)


def docker_run_status(message: str) -> int:
    """What `docker run` exits with when its container's command does not start (docker's CLI,
    runStartContainerErr, on the runtime's message)."""
    if "executable file not found" in message or "no such file or directory" in message:
        return 127
    if "permission denied" in message or "is a directory" in message:
        return 126
    return 125


@pytest.mark.parametrize("argv", [["/etc"], ["/etc/passwd"], ["/bin/nope"], ["no-such-cmd"]])
def test_a_command_that_cannot_start_exits_as_docker_run_does_under_runc(argv: list[str], rootfs: Path,
                                                                         tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, rootfs, Case("fail", argv), tmp_path)
    cid = f"diff-{uuid.uuid4().hex[:8]}"
    try:
        runc = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True, timeout=60)
    assert runc.returncode != 0
    pyk = subprocess.run([PYKATA, "run", "--rm", "busybox", *argv], capture_output=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    err = pyk.stderr.decode(errors="replace")
    assert pyk.returncode == docker_run_status(runc.stderr.decode(errors="replace")), (runc.stderr, err)
    assert err.startswith("pykata: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
