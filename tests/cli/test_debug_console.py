"""`pykata sandbox exec`: the debug console, a shell in the guest itself, only where the host's configuration
enables it; a pod's annotation cannot.

Two sandboxes owned by this test (pykata.AsyncSandbox), one started with the console on, one with it off,
in a private runtime dir; the CLI is run with either configuration file."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import pykata
from pykata.config import load_config, load_config_file
from pykata.config.annotations import apply_annotations
from pykata.errors import ConfigError, InvalidArgument
from pykata.shim.tasks.pod import pod_config
from tests.cli.ptysession import pty_session

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")
# the VM tests share two sandboxes (a module fixture), so they share its event loop
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def confs() -> Iterator[tuple[Path, Path]]:
    d = Path(tempfile.mkdtemp(prefix="pkdc", dir="/tmp"))  # short: unix socket paths
    on, off = d / "on.toml", d / "off.toml"
    on.write_text(f'[runtime]\nruntime_dir = "{d}/run"\n[agent.pykata]\ndebug_console_enabled = true\n')
    off.write_text(f'[runtime]\nruntime_dir = "{d}/run"\n')
    yield on, off
    shutil.rmtree(d, ignore_errors=True)


def run(conf: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PYKATA, "sandbox", "exec", *args], capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**(env or os.environ), "PYKATA_CONFIG": str(conf)})


def test_annotations_cannot_enable_the_debug_console() -> None:
    config = load_config()
    for name in ("io.katacontainers.config.agent.debug_console_enabled",
                 "io.katacontainers.config.agent.debug_console"):
        with pytest.raises(ConfigError, match="unknown agent annotation"):
            apply_annotations(config, {name: "true"})
    # not through the hypervisor section either, even when the admin lists it there
    allowing = dataclasses.replace(config, hypervisor=dataclasses.replace(
        config.hypervisor, qemu=dataclasses.replace(config.qemu, enable_annotations=("debug_console_enabled",))))
    with pytest.raises(ConfigError):
        apply_annotations(allowing, {"io.katacontainers.config.hypervisor.debug_console_enabled": "true"})
    assert config.agent.pykata.debug_console_enabled is False  # off by default
    # the shim's own path for a pod's annotations fails the pod, naming the annotation
    with pytest.raises(InvalidArgument, match="debug_console_enabled"):
        pod_config({"io.katacontainers.config.agent.debug_console_enabled": "true"})


def test_disabled_by_the_host_is_refused_before_asking(confs: tuple[Path, Path]) -> None:
    p = run(confs[1], "no-such-sandbox", "--", "true")
    assert p.returncode == 1 and b"debug console is disabled" in p.stderr and b"Traceback" not in p.stderr
    assert b"debug_console_enabled" in p.stderr


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandboxes(confs: tuple[Path, Path]) -> AsyncIterator[tuple[pykata.AsyncSandbox, pykata.AsyncSandbox]]:
    on = await pykata.AsyncSandbox(image="busybox", config=load_config_file(confs[0])).__aenter__()
    try:
        off = await pykata.AsyncSandbox(image="busybox", config=load_config_file(confs[1])).__aenter__()
        try:
            yield on, off
        finally:
            await off.close()
    finally:
        await on.close()


@pytest.mark.vm
@module_loop
async def test_debug_console_runs_in_the_guest_not_a_container(
        confs: tuple[Path, Path], sandboxes: tuple[pykata.AsyncSandbox, pykata.AsyncSandbox]) -> None:
    on, off = sandboxes
    conf_on = confs[0]
    # the guest's PID 1 (its init/agent), where a container's would be the container's own process
    p = await asyncio.to_thread(run, conf_on, on.id[:12], "--", "cat", "/proc/1/cmdline")
    assert p.returncode == 0, p.stderr
    guest_init = p.stdout.split(b"\0")
    container_init = (await on.exec(["cat", "/proc/1/cmdline"])).stdout.split(b"\0")
    assert guest_init != container_init
    assert any(b"pykata" in a or a in (b"/init", b"/sbin/init") for a in guest_init), guest_init
    # outside the containers: the guest's root holds the agent's state, with the container's bundle
    p = await asyncio.to_thread(run, conf_on, on.id, "--", "ls", "/run/pykata-agent/bundles")
    assert p.returncode == 0 and on.id.encode() in p.stdout.split(), (p.stdout, p.stderr)
    assert (await on.exec(["ls", "/run/pykata-agent"])).exit_code != 0
    # the exit status comes back; nothing of the admin's environment but TERM reaches the guest
    secret = {**os.environ, "PYKATA_TEST_SECRET": "s3cr3t", "TERM": "xterm"}
    p = await asyncio.to_thread(run, conf_on, on.id, "--", "sh", "-c", "env; exit 7", env=secret)
    assert p.returncode == 7 and b"TERM=xterm" in p.stdout and b"s3cr3t" not in p.stdout

    # a sandbox started without the console: the agent refuses, whatever the CLI's configuration says
    p = await asyncio.to_thread(run, conf_on, off.id, "--", "true")
    assert p.returncode == 126 and b"debug console is disabled" in p.stderr and b"Traceback" not in p.stderr
    # a program the guest lacks: one line naming it
    p = await asyncio.to_thread(run, conf_on, on.id, "--", "no-such-program")
    assert p.returncode == 126 and b"no-such-program" in p.stderr and b"Traceback" not in p.stderr


@pytest.mark.vm
@module_loop
async def test_debug_console_interactive_shell_has_a_real_terminal(
        confs: tuple[Path, Path], sandboxes: tuple[pykata.AsyncSandbox, pykata.AsyncSandbox]) -> None:
    on, _ = sandboxes
    env = {**os.environ, "PYKATA_CONFIG": str(confs[0]), "TERM": "xterm"}
    typed = b"tty; echo $((6*7)); printf '\\033[21t\\033]52;c;?\\007vis''ible\\n'; exit 3\r"
    code, out = await asyncio.to_thread(pty_session, [PYKATA, "sandbox", "exec", on.id], env, typed=typed)
    assert code == 3, out
    assert b"/dev/pts/" in out and b"42" in out
    # the guest asked the admin's terminal for its title and clipboard: those never reach it
    assert b"visible" in out and b"\x1b[21t" not in out and b"\x1b]52" not in out


@pytest.mark.vm
@module_loop
async def test_cp_copies_files_both_ways(confs: tuple[Path, Path], tmp_path: Path,
                                         sandboxes: tuple[pykata.AsyncSandbox, pykata.AsyncSandbox]) -> None:
    on, _ = sandboxes
    env = {**os.environ, "PYKATA_CONFIG": str(confs[1])}

    def cp(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([PYKATA, "cp", *args], capture_output=True, timeout=120, env=env)

    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    src.chmod(0o640)
    p = await asyncio.to_thread(cp, str(src), f"{on.id}:/tmp/copied.bin")
    assert p.returncode == 0, p.stderr
    assert (await on.exec(["sha256sum", "/tmp/copied.bin"])).stdout.split()[0].decode() == \
        hashlib.sha256(src.read_bytes()).hexdigest()
    back = tmp_path / "back.bin"
    p = await asyncio.to_thread(cp, f"{on.id[:12]}:/tmp/copied.bin", str(back))
    assert p.returncode == 0, p.stderr
    assert back.read_bytes() == src.read_bytes() and back.stat().st_mode & 0o777 == 0o640
    # a cap on what the guest may send, a directory, a missing file: one line each, nothing left behind
    for args, needle in (((f"{on.id}:/tmp/copied.bin", str(tmp_path / "capped"), "--max-bytes", "1000"),
                          b"more than 1000 bytes"),
                         ((f"{on.id}:/tmp", str(tmp_path / "dir")), b"not a file"),
                         ((f"{on.id}:/no/such", str(tmp_path / "missing")), b"/no/such"),
                         ((str(src), str(tmp_path / "x")), b"SANDBOX:PATH")):
        p = await asyncio.to_thread(cp, *args)
        assert p.returncode != 0 and needle in p.stderr and b"Traceback" not in p.stderr, (args, p.stderr)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["back.bin", "in.bin"]
