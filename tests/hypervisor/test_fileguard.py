"""The guard a file server for the guest starts under (pykata.hypervisor.fileguard), in a real child
process: what it refuses and what it leaves alone."""

from __future__ import annotations

import os
import stat
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


# What a QEMU taken over by its guest would run: io_uring (a large kernel surface, and requests seccomp
# never sees), fchmod with S_ISUID/S_ISGID on a descriptor it holds of a file the guest chowned to the
# jail uid, and the same calls through i386's `int $0x80`, which a filter checking only x86_64's
# numbers would let by.
VMM_PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
static void show(const char *name, long r) {
    const char *e = errno == ENOSYS ? "ENOSYS" : errno == EPERM ? "EPERM" : errno == EBADF ? "EBADF" : "other";
    printf("%s=%s\n", name, r >= 0 ? "ok" : e);
}
static long int80(long nr, long a, long b) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b) : "memory");
    if (r < 0 && r > -4096) { errno = (int)-r; return -1; }
    return r;
}
int main(int argc, char **argv) {
    int fd = atoi(argv[1]);
    gid_t uid = (gid_t)atoi(argv[3]);  /* QEMU's -runas: after exec, under the filter */
    if (setgroups(0, NULL) || setresgid(uid, uid, uid) || setresuid(uid, uid, uid)) return 3;
    char params[120] = {0};
    static char params32[120];
    show("io_uring_setup", syscall(425, 4, params));
    show("io_uring_enter", syscall(426, -1, 0, 0, 0, NULL, 0));
    show("fchmod-0755", fchmod(fd, 0755));
    show("fchmod-4755", fchmod(fd, 04755));
    show("fchmodat-2755", fchmodat(AT_FDCWD, argv[2], 02755, 0));
    show("keyctl", syscall(250, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* the session keyring */, 0));
    show("userfaultfd", syscall(323, 1 /* UFFD_USER_MODE_ONLY */));
    show("i386-io_uring_setup", int80(425, 4, (long)params32));
    show("i386-fchmod-4755", int80(94, fd, 04755));
    return 0;
}
"""
JAIL_UID = 3999998


@pytest.fixture(scope="module")
def vmm_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vmmprobe")
    (d / "probe.c").write_text(VMM_PROBE)
    subprocess.run(["cc", "-O1", "-o", str(d / "probe"), str(d / "probe.c")], check=True, timeout=60)
    return d / "probe"


def _run_as_jailed_qemu(probe: Path, victim: Path, guard: Callable[[], None] | None) -> dict[str, str]:
    """The probe started as the driver starts QEMU (the preexec step `guard`, as root), dropping to a
    jail uid itself (as QEMU's -runas), holding a descriptor of `victim` (the proxy helper hands QEMU
    those)."""
    fd = os.open(victim, os.O_RDONLY)
    try:
        out = subprocess.run([str(probe), str(fd), f"/proc/self/fd/{fd}", str(JAIL_UID)], preexec_fn=guard,
                             pass_fds=(fd,),
                             capture_output=True, text=True, timeout=30, check=True).stdout
    finally:
        os.close(fd)
    return dict(line.split("=") for line in out.split())


def test_jailed_qemu_gets_no_io_uring_and_no_setuid_modes(tmp_path: Path, vmm_probe: Path) -> None:
    """The attack: a taken-over QEMU sets up io_uring (or reaches the keyrings or userfaultfd), and
    sets the setuid bit on a file of the guest's share that the guest chowned to QEMU's jail uid (a
    setuid-jail-uid program left on the host).
    Under the driver's filter (fileguard.vmm_child) every such call fails; without it they work."""
    from pykata.hypervisor.qemu import driver

    assert driver.fileguard.vmm_child is fileguard.vmm_child  # what the driver installs for a jailed QEMU
    victim = tmp_path / "guest-file"
    victim.write_bytes(b"#!/bin/sh\n")
    os.chown(victim, JAIL_UID, JAIL_UID)
    victim.chmod(0o644)
    jailed = _run_as_jailed_qemu(vmm_probe, victim, fileguard.vmm_child)
    assert jailed == {"io_uring_setup": "ENOSYS", "io_uring_enter": "ENOSYS", "fchmod-0755": "ok",
                      "keyctl": "ENOSYS", "userfaultfd": "ENOSYS",
                      "fchmod-4755": "EPERM", "fchmodat-2755": "EPERM", "i386-io_uring_setup": "ENOSYS",
                      "i386-fchmod-4755": "ENOSYS"}, jailed
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    # the control: the same process without the filter does all of it (the probe is sound)
    free = _run_as_jailed_qemu(vmm_probe, victim, None)
    assert free["io_uring_setup"] == "ok" and free["io_uring_enter"] == "EBADF", free
    assert free["fchmod-4755"] == "ok" and free["i386-fchmod-4755"] == "ok", free
    assert free["keyctl"] == "ok" and free["userfaultfd"] == "ok", free
    assert victim.stat().st_mode & stat.S_ISUID
    victim.unlink()


def test_check_probe_sees_io_uring_refused_under_the_vmm_filter_only() -> None:
    assert fileguard.io_uring_refused()  # what `pykata check` reports as the no-io-uring layer
    assert not fileguard.io_uring_refused(None)  # the control: this kernel has io_uring
