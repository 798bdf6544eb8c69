"""`pykata sandbox exec`: the debug console, a shell in the guest itself, only where the host's configuration
enables it; a pod's annotation cannot.

Two sandboxes owned by this test (pykata.AsyncSandbox), one started with the console on, one with it off,
in a private runtime dir; the CLI is run with either configuration file."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pty
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import pykata
from pykata.config import load_config, load_config_file
from pykata.config.annotations import apply_annotations
from pykata.errors import ConfigError

PYKATA = str(Path(__file__).resolve().parents[2] / ".venv/bin/pykata")


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


def test_disabled_by_the_host_is_refused_before_asking(confs: tuple[Path, Path]) -> None:
    p = run(confs[1], "no-such-sandbox", "--", "true")
    assert p.returncode == 1 and b"debug console is disabled" in p.stderr and b"Traceback" not in p.stderr
    assert b"debug_console_enabled" in p.stderr


@pytest.fixture(scope="module")
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
    # outside the containers: the guest's root has the agent's python; the busybox container has none
    p = await asyncio.to_thread(run, conf_on, on.id, "--", "sh", "-c", "ls /usr/bin/python3 && hostname")
    assert p.returncode == 0 and b"/usr/bin/python3" in p.stdout, p.stderr
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


def _pty_session(argv: list[str], env: dict[str, str], typed: bytes, timeout: float = 120) -> tuple[int, bytes]:
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(argv[0], argv, env)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if not sent and b"#" in out:  # the guest shell's prompt
                os.write(fd, typed)
                sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out


@pytest.mark.vm
async def test_debug_console_interactive_shell_has_a_real_terminal(
        confs: tuple[Path, Path], sandboxes: tuple[pykata.AsyncSandbox, pykata.AsyncSandbox]) -> None:
    on, _ = sandboxes
    env = {**os.environ, "PYKATA_CONFIG": str(confs[0]), "TERM": "xterm"}
    code, out = await asyncio.to_thread(_pty_session, [PYKATA, "sandbox", "exec", on.id], env,
                                        b"tty; echo $((6*7)); exit 3\r")
    assert code == 3, out
    assert b"/dev/pts/" in out and b"42" in out
