"""The 9p proxy helper's start: QEMU is not held back waiting for it, and one that dies at once is
still reported with a clear error (by the driver once QEMU answers: Sidecars.check_running)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykata.errors import HypervisorError
from pykata.hypervisor.qemu.proxy9p import Proxy9p


async def test_a_helper_that_exits_at_once_is_reported_not_waited_for(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    # A fake helper: /bin/false stands in for a virtfs-proxy-helper that refuses its arguments.
    proxy = Proxy9p(shared, tmp_path / "proxy.log", binary="/bin/false", mount_namespace=False)
    started = time.monotonic()
    await proxy.start()
    assert time.monotonic() - started < 5  # no fixed pause before QEMU may start
    assert proxy.qemu_fd is not None
    try:
        assert proxy.child is not None
        await proxy.child.wait(5)
        with pytest.raises(HypervisorError, match="9p proxy helper exited with code 1 at start"):
            proxy.check_running()
    finally:
        await proxy.stop()
    assert proxy.qemu_fd is None


async def test_a_running_helper_passes_the_check(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    proxy = Proxy9p(shared, tmp_path / "proxy.log", mount_namespace=False)
    await proxy.start()
    try:
        await asyncio.sleep(0.05)
        proxy.check_running()
    finally:
        await proxy.stop()


# A stand-in for a virtfs-proxy-helper taken over through a jailed QEMU's 9p requests (a FAKE helper:
# a Python program started exactly as the real one, same argv prefix and seccomp filter): it reports
# what it can learn about, or do to, a process of the host, then serves on until it is stopped.
TAKEN_OVER_HELPER = """#!{python}
import os, sys, time
victim = {victim}
out = ["pid=%d" % os.getpid()]
def attempt(name, call):
    try:
        call()
        out.append(name + "=ok")
    except OSError as exc:
        out.append(name + "=" + (os.strerror(exc.errno) if exc.errno else "?").replace(" ", "_"))
attempt("getpgid", lambda: os.getpgid(victim))
attempt("getsid", lambda: os.getsid(victim))
attempt("getpriority", lambda: os.getpriority(os.PRIO_PROCESS, victim))
attempt("sched_getaffinity", lambda: os.sched_getaffinity(victim))
attempt("kill", lambda: os.kill(victim, 0))
attempt("kill-all", lambda: os.kill(-1, 0))
print(" ".join(out), flush=True)
while True:
    time.sleep(60)
"""


def _running_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_a_taken_over_helper_sees_no_host_process_and_stops_exactly(tmp_path: Path) -> None:
    """The attack: virtfs-proxy-helper runs as uid 0; taken over, it looks for the host's processes
    (containerd, kubelet, other pods' QEMUs) to signal or probe. In its own PID namespace it is pid 2
    (the namespace's init is pid 1) and no host pid exists for it: ESRCH even for calls its seccomp
    filter lets through; kill(-1) reaches nobody. stop() ends it, init and wrapper, with nothing left."""
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = subprocess.Popen(["sleep", "60"])
    try:
        probe = tmp_path / "taken-over-helper"
        # the system's interpreter: the helper's root (pykata.hypervisor.helperroot) holds /usr, not the venv
        probe.write_text(TAKEN_OVER_HELPER.format(python=os.path.realpath(sys.executable), victim=victim.pid))
        probe.chmod(0o755)
        proxy = Proxy9p(shared, tmp_path / "proxy.log", binary=str(probe))
        await proxy.start()
        try:
            report = ""
            for _ in range(200):
                report = (tmp_path / "proxy.log").read_text() if (tmp_path / "proxy.log").exists() else ""
                if "kill-all=" in report:
                    break
                await asyncio.sleep(0.05)
            assert report.split() == ["pid=2", "getpgid=No_such_process", "getsid=No_such_process",
                                      "getpriority=No_such_process", "sched_getaffinity=No_such_process",
                                      "kill=Operation_not_permitted", "kill-all=Operation_not_permitted"], report
            assert len(_running_with(str(probe))) == 3  # outer unshare, the namespace's init, the helper
            started = time.monotonic()
        finally:
            await proxy.stop()
        assert time.monotonic() - started < 2
        assert _running_with(str(probe)) == []
        await proxy.stop()  # idempotent
        assert victim.poll() is None
        # the same calls from the host's PID namespace do find the process: the probe is sound
        assert os.getpgid(victim.pid) > 0 and os.sched_getaffinity(victim.pid)
    finally:
        victim.kill()
        victim.wait()
