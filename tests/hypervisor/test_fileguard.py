"""The guard a file server for the guest starts under (pykata.hypervisor.fileguard), in a real child
process: what it refuses and what it leaves alone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pykata.hypervisor import fileguard

PROBE = r"""
import errno, os, stat, sys
d = sys.argv[1]
def t(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
open(d + "/f", "w").close()
t("chmod-0755", lambda: os.chmod(d + "/f", 0o755))
t("chmod-4755", lambda: os.chmod(d + "/f", 0o4755))
t("chmod-2755", lambda: os.chmod(d + "/f", 0o2755))
t("create-4755", lambda: os.close(os.open(d + "/g", os.O_CREAT | os.O_WRONLY, 0o4755)))
t("create-0644", lambda: os.close(os.open(d + "/h", os.O_CREAT | os.O_WRONLY, 0o644)))
t("mknod-chr", lambda: os.mknod(d + "/c", 0o666 | stat.S_IFCHR, os.makedev(1, 3)))
t("mknod-blk", lambda: os.mknod(d + "/b", 0o666 | stat.S_IFBLK, os.makedev(7, 0)))
t("mknod-fifo", lambda: os.mknod(d + "/p", 0o666 | stat.S_IFIFO))
t("mkdir-2775", lambda: os.mkdir(d + "/sgid", 0o2775))
t("mkdir-4755", lambda: os.mkdir(d + "/suid", 0o4755))
"""
REFUSED = {"chmod-4755", "chmod-2755", "create-4755", "mknod-chr", "mknod-blk", "mkdir-4755"}


@pytest.mark.parametrize("guard", [fileguard.guard_child, fileguard.filter_child], ids=["full", "filter"])
def test_guard_refuses_setuid_modes_and_device_nodes(tmp_path: Path, guard: Callable[[], None]) -> None:
    res = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], preexec_fn=guard, capture_output=True,
                         text=True, check=True)
    outcome = dict(line.split() for line in res.stdout.splitlines())
    assert outcome == {k: ("EPERM" if k in REFUSED else "ok") for k in outcome}, outcome
    assert len(outcome) == 10
    for name in ("f", "h", "sgid"):
        assert not (tmp_path / name).stat().st_mode & 0o4000


def test_full_guard_drops_the_capabilities_from_the_bounding_set() -> None:
    res = subprocess.run(["grep", "CapBnd", "/proc/self/status"], preexec_fn=fileguard.guard_child,
                         capture_output=True, text=True, check=True)
    bounding = int(res.stdout.split()[1], 16)
    for cap in fileguard.DROPPED_CAPS:
        assert not bounding & (1 << cap)
    assert bounding & (1 << 21)  # CAP_SYS_ADMIN (say) stays: only the three are dropped


REACH_PROBE = """
import ctypes, errno, fcntl, os, socket, sys
victim = int(sys.argv[1])
out = []
def attempt(name, call):
    try:
        call()
        out.append(name + "=ok")
    except OSError as e:
        out.append(name + "=" + errno.errorcode[e.errno])
libc = ctypes.CDLL(None, use_errno=True)
def ptrace():
    if libc.ptrace(16, victim, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
s = socket.socket()
attempt("kill", lambda: os.kill(victim, 0))
attempt("kill-init", lambda: os.kill(1, 0))
attempt("pidfd_open", lambda: os.close(os.pidfd_open(victim)))
attempt("ptrace", ptrace)
attempt("F_SETOWN", lambda: fcntl.fcntl(s.fileno(), fcntl.F_SETOWN, victim))
attempt("F_GETFL", lambda: fcntl.fcntl(s.fileno(), fcntl.F_GETFL))
attempt("write", lambda: os.write(2, b""))
import resource
attempt("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, victim, 19))
# PRIO_USER reaches every process of a uid: a uid with none, so that the unfiltered run changes nothing
attempt("setpriority-user", lambda: os.setpriority(os.PRIO_USER, 3999999, 19))
attempt("sched_setaffinity", lambda: os.sched_setaffinity(victim, {0}))
attempt("sched_setscheduler", lambda: os.sched_setscheduler(victim, os.SCHED_IDLE, os.sched_param(0)))
attempt("prlimit", lambda: resource.prlimit(victim, resource.RLIMIT_NOFILE, (1, 1)))
attempt("own-affinity", lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)))
attempt("own-prlimit", lambda: resource.prlimit(0, resource.RLIMIT_NOFILE))
print(" ".join(out))
"""


def test_proxy_helper_filter_keeps_it_from_other_processes() -> None:
    """The attack: virtfs-proxy-helper runs as uid 0 in the host's PID namespace, and a process may
    signal or trace every process of its uid: taken over through a jailed QEMU's requests, it could
    kill containerd or kubelet. Under filter_child (what the helper starts with) a real process, as
    root, can neither signal, pidfd_open, ptrace nor become a descriptor's SIGIO owner of another
    process; its other calls work."""
    # every call of the probe aims at `victim` (a sleep of this test's) or at nothing (signal 0, a uid
    # with no process): run unfiltered, as the control below does, it must change nothing else
    victim = subprocess.Popen(["sleep", "60"])
    try:
        out = subprocess.run([sys.executable, "-c", REACH_PROBE, str(victim.pid)], preexec_fn=fileguard.filter_child,
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        assert out == ["kill=EPERM", "kill-init=EPERM", "pidfd_open=EPERM", "ptrace=EPERM", "F_SETOWN=EPERM",
                       "F_GETFL=ok", "write=ok", "setpriority=EPERM", "setpriority-user=EPERM",
                       "sched_setaffinity=EPERM", "sched_setscheduler=EPERM", "prlimit=EPERM",
                       "own-affinity=ok", "own-prlimit=ok"], out
        # without the filter the same probe reaches it: the test itself is sound
        free = subprocess.run([sys.executable, "-c", REACH_PROBE, str(victim.pid)], capture_output=True,
                              text=True, timeout=30, check=True).stdout.split()
        assert "kill=ok" in free and "pidfd_open=ok" in free and "prlimit=ok" in free
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
