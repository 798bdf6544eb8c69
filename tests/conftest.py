"""Session-wide fixtures. The leak check fails the run if anything a test made outlives it."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.vmfactory import VmFactory

# A run started with SIGINT ignored (a background job of a shell without job control, nohup) would
# give Python no KeyboardInterrupt handler, here or in the Python children the Ctrl-C tests start (an
# ignored signal stays ignored across exec): those tests then waited for an interrupt that never
# came. Restore Python's own handler, so SIGINT acts as a terminal's Ctrl-C does; the children start
# with the default disposition again (a caught signal is reset at exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

LEAK_PATTERNS = ("qemu-system", "virtiofsd", "virtfs-proxy-helper", "bin/passt", "containerd-shim-pykata",
                 "pykata-agent")
RUNTIME_DIRS = ("/run/pykata", "/var/run/pykata")


def _processes() -> set[tuple[int, str]]:
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(p in cmdline for p in LEAK_PATTERNS):
            found.add((proc.info["pid"], cmdline[:160]))
    return found


def _mounts() -> set[str]:
    lines = Path("/proc/mounts").read_text().splitlines()
    return {ln for ln in lines if any(f" {d}" in ln for d in RUNTIME_DIRS)}


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def _taps() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "type", "tun"], capture_output=True, text=True, check=False
    ).stdout
    return {ln.split(":")[1].strip() for ln in out.splitlines() if ln.strip()}


def _filter_rules() -> set[str]:
    """The host filter rules an egress sandbox makes (pykata.network.egress): its chain and jumps."""
    found = set()
    for tool in ("iptables", "ip6tables"):
        try:
            out = subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=False).stdout
        except FileNotFoundError:
            continue
        found |= {f"{tool} {ln}" for ln in out.splitlines() if "PYKATA-" in ln or "pykata sandbox" in ln}
    return found


def _host_cpus_online() -> set[str]:
    """The host's online CPUs: an agent run on the host by a test must never take one offline
    (OnlineCPUMem offlines CPUs down to the size asked: it once left this host with one CPU)."""
    try:
        return {Path("/sys/devices/system/cpu/online").read_text().strip()}
    except OSError:
        return set()


def snapshot_resources() -> dict[str, set[object]]:
    return {"processes": set(_processes()), "mounts": set(_mounts()), "netns": set(_netns()),
            "taps": set(_taps()), "filter rules": set(_filter_rules()), "host CPUs online": set(_host_cpus_online())}


_BEFORE: dict[str, set[object]] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    _BEFORE.update(snapshot_resources())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    after = snapshot_resources()
    leaks = {kind: sorted(map(str, after[kind] - _BEFORE.get(kind, set()))) for kind in after}
    leaks = {k: v for k, v in leaks.items() if v}
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"LEAK CHECK FAILED: {kind}: {items}" for kind, items in leaks.items()]
        if reporter is not None:
            for line in lines:
                reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
async def vm_factory(request: pytest.FixtureRequest) -> AsyncIterator[VmFactory]:
    """VMs for one test (tests/vmfactory.py): each is stopped at the test's end and checked to have left
    no process and no directory; a leak fails this test's teardown, naming the test and the VM."""
    factory = VmFactory(request.node.nodeid)
    yield factory
    problems = await factory.stop_and_check()
    if problems:
        pytest.fail(f"{request.node.nodeid} left VM resources behind:\n" + "\n".join(problems), pytrace=False)
