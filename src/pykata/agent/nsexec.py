"""The agent's own `crun exec --detach`: a process started in a running container without crun.

Under TCG each crun call spends most of its time starting (a dynamically linked binary and ten
shared libraries: ~40-70 ms in the guest before it does any work), and an exec is one such call.
This module does what `crun exec` does for one process spec, from a child forked off the agent:

  1. join the container's cgroup (v2: write "0" to its cgroup.procs, before the cgroup namespace)
  2. setns(pidfd of the container's init, its namespaces): mount (which also makes the container's
     root our root and cwd), pid (for children), ipc, uts, net, cgroup
  3. rlimits; bounding set (drop every capability not listed); keep capabilities across the
     user change; setgroups/setresgid/setresuid; umask; chdir(cwd) as that user
  4. effective/permitted/inheritable (capset), ambient (clear, then raise each), no_new_privs,
     then the container's seccomp filter: crun's own compiled program from its state directory
     (what `crun exec` loads too)
  5. posix_spawn the program (PATH searched in the process's environment, like crun) with the
     stdio pipes as 0/1/2, a new session, every signal at its default and none blocked; every
     other descriptor of the agent is made close-on-exec first (close_range), so none reaches
     the container
  6. report its pid over a pipe and exit; the process re-parents to the agent (a subreaper)

It covers what the guest sees from containerd and the SDK: cgroup v2, no user or time namespace,
no terminal, no OOM score or scheduling fields, seccomp without flags or a listener. `plan()`
answers None for anything else, and the agent runs crun instead (the same result, slower).

The process never gets more than the spec asks for or crun would give: every set comes from the
process spec alone and is applied in the kernel's order; nothing is inherited from the agent but
what crun would inherit (the agent is root with every capability, as crun is); the bounding set is
reduced before the user changes. tests/agent/test_nsexec_vm.py runs the same execs both ways in a
guest and compares what the process sees, and tries the known escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import os
import resource
import signal
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pykata.agent.reaper import ExitStatus, Reaper, exited_children
from pykata.agent.spawner import MAX_REQUEST, REQUEST_FDS, Spawner, SpawnerGone
from pykata.errors import Code, PykataError
from pykata.record import FrozenRecord

CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
_CAP_NUMBER = {name: i for i, name in enumerate(CAPABILITIES)}

NAMESPACE_FLAGS = {  # OCI namespace type -> CLONE_NEW*
    "mount": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
    "pid": 0x20000000, "network": 0x40000000,
}
_RLIMITS = {f"RLIMIT_{n}": i for i, n in enumerate((  # Linux's numbering (Python lacks some names)
    "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK", "AS", "LOCKS",
    "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME"))}

SYS_close_range = 436  # x86_64
CLOSE_RANGE_CLOEXEC = 1 << 2
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
MAX_SECCOMP_INSTRUCTIONS = 4096
REPORT_LIMIT = 4096
# The static program that does what `_child` does (guestimage/execstart.c), started with posix_spawn:
# nothing of the agent is forked (see `spawn`). Absent (an image built without a C compiler): `_child`.
EXECSTART = Path("/usr/libexec/pykata/execstart")
EXECSTART_MAGIC = 0x32584B50  # "PKX2" (PKX1 carried a timing flag)
# the plan goes through a pipe written before the start: at most what an empty pipe takes at once
EXECSTART_PLAN_LIMIT = 65536
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
# every signal a spawned program starts with at its default action
_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


class ExecFailed(PykataError):
    """The program could not be started; the message is what crun would say, and a missing
    program answers NOT_FOUND as crun's message does."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
        self.rpc_code = Code.NOT_FOUND if missing else Code.INTERNAL


class ExecPlan(FrozenRecord):
    """Everything the child applies, computed and checked before the fork (the spawner gets its
    `_asdict()` and rebuilds it with `ExecPlan(**fields)`)."""

    __slots__ = ("ambient", "args", "bounding", "cgroup_procs", "cwd", "effective", "env", "gid", "groups",
                 "inheritable", "init_pid", "no_new_privileges", "ns_flags", "permitted", "rlimits", "seccomp",
                 "uid", "umask")
    __match_args__ = ("init_pid", "ns_flags", "cgroup_procs", "args", "env", "cwd", "uid", "gid", "groups", "umask",
                      "bounding", "effective", "permitted", "inheritable", "ambient", "no_new_privileges",
                      "rlimits", "seccomp")
    init_pid: int
    ns_flags: int
    cgroup_procs: Path
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int | None
    bounding: int
    effective: int
    permitted: int
    inheritable: int
    ambient: tuple[int, ...]
    no_new_privileges: bool
    rlimits: tuple[tuple[int, int, int], ...]
    seccomp: bytes | None

    def __init__(self, init_pid: int, ns_flags: int, cgroup_procs: Path, args: tuple[str, ...],
                 env: tuple[str, ...], cwd: str, uid: int, gid: int, groups: tuple[int, ...], umask: int | None,
                 bounding: int, effective: int, permitted: int, inheritable: int, ambient: tuple[int, ...],
                 no_new_privileges: bool, rlimits: tuple[tuple[int, int, int], ...], seccomp: bytes | None) -> None:
        self._init("init_pid", init_pid)
        self._init("ns_flags", ns_flags)
        self._init("cgroup_procs", cgroup_procs)
        self._init("args", args)
        self._init("env", env)
        self._init("cwd", cwd)
        self._init("uid", uid)
        self._init("gid", gid)
        self._init("groups", groups)
        self._init("umask", umask)
        self._init("bounding", bounding)
        self._init("effective", effective)
        self._init("permitted", permitted)
        self._init("inheritable", inheritable)
        self._init("ambient", ambient)
        self._init("no_new_privileges", no_new_privileges)
        self._init("rlimits", rlimits)
        self._init("seccomp", seccomp)


def _mask(names: object) -> int | None:
    if not isinstance(names, list):
        return None
    mask = 0
    for name in names:
        number = _CAP_NUMBER.get(name) if isinstance(name, str) else None
        if number is None:
            return None
        mask |= 1 << number
    return mask


def plan(config: Mapping[str, Any], process: Mapping[str, Any], *, init_pid: int, cgroup_dir: Path | None,
         cgroup_version: int, crun_state: Path) -> ExecPlan | None:
    """The native plan for exec'ing `process` (an OCI process, checked by bundle.check_process) in
    the container of `config` (its rewritten config.json), or None where crun must do it."""
    linux = config.get("linux") or {}
    if cgroup_version != 2 or cgroup_dir is None or init_pid <= 0 or process.get("terminal"):
        return None
    if any(k in process for k in ("oomScoreAdj", "scheduler", "ioPriority", "execCPUAffinity",
                                  "apparmorProfile", "selinuxLabel", "consoleSize")):
        return None
    flags = 0
    for ns in linux.get("namespaces") or []:
        flag = NAMESPACE_FLAGS.get(str(ns.get("type"))) if isinstance(ns, dict) else None
        if flag is None:
            return None  # user, time or something unknown: crun knows how
        flags |= flag
    seccomp: bytes | None = None
    if linux.get("seccomp"):
        profile = linux["seccomp"]
        if not isinstance(profile, dict) or profile.get("flags") or profile.get("listenerPath"):
            return None
        try:
            seccomp = (crun_state / "seccomp.bpf").read_bytes()
        except OSError:
            return None
        if not seccomp or len(seccomp) % 8 or len(seccomp) // 8 > MAX_SECCOMP_INSTRUCTIONS:
            return None
    caps = process.get("capabilities") or {}
    masks = {k: _mask(caps.get(k, [])) for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
    if any(m is None for m in masks.values()):
        return None
    rlimits = []
    for r in process.get("rlimits") or []:
        number = _RLIMITS.get(str(r.get("type"))) if isinstance(r, dict) else None
        if number is None:
            return None
        values = [_rlimit_value(r.get("soft", 0)), _rlimit_value(r.get("hard", 0))]
        if None in values:
            return None  # crun says what is wrong with it (or sets what Python cannot express)
        rlimits.append((number, values[0] or 0, values[1] or 0))
    user = process.get("user") or {}
    ambient = masks["ambient"] or 0
    return ExecPlan(
        init_pid=init_pid, ns_flags=flags, cgroup_procs=cgroup_dir / "cgroup.procs",
        args=tuple(process["args"]), env=tuple(process.get("env") or ()), cwd=process.get("cwd") or "/",
        uid=int(user.get("uid", 0)), gid=int(user.get("gid", 0)),
        groups=tuple(int(g) for g in user.get("additionalGids") or ()), umask=user.get("umask"),
        bounding=masks["bounding"] or 0, effective=masks["effective"] or 0,
        permitted=masks["permitted"] or 0, inheritable=masks["inheritable"] or 0,
        ambient=tuple(i for i in range(len(CAPABILITIES)) if ambient >> i & 1),
        no_new_privileges=bool(process.get("noNewPrivileges")), rlimits=tuple(rlimits), seccomp=seccomp)


def _rlimit_value(value: object) -> int | None:
    """An OCI rlimit value as resource.setrlimit takes it (RLIM_INFINITY, 2**64-1, is -1 there)."""
    if not isinstance(value, int) or value < 0:
        return None
    if value == (1 << 64) - 1:
        return resource.RLIM_INFINITY
    return value if value < 1 << 63 else None


def encode_plan(p: ExecPlan) -> bytes | None:
    """Plan `p` as guestimage/execstart.c reads it (little-endian fields, strings as length, bytes, NUL),
    or None where that program cannot carry it (a NUL in a string, too large): `_child` then runs.

    The environment is the one `_child` hands posix_spawn (entries without "=" left out, a repeated
    name's last value at its first place), and the PATH searched is the first one, as `_child` does."""
    env = dict(e.split("=", 1) for e in p.env if "=" in e)
    search = next((e[5:] for e in p.env if e.startswith("PATH=")), DEFAULT_PATH)
    texts = [*p.args, *(f"{k}={v}" for k, v in env.items()), p.cwd, search]
    if any("\0" in t for t in texts) or not p.args:
        return None
    out = bytearray(struct.pack("<IiIIiQQQQQI", EXECSTART_MAGIC, p.ns_flags, p.uid, p.gid,
                                -1 if p.umask is None else p.umask, p.bounding, p.effective, p.permitted,
                                p.inheritable, sum(1 << cap for cap in p.ambient), int(p.no_new_privileges)))
    out += struct.pack(f"<I{len(p.groups)}I", len(p.groups), *p.groups)
    out += struct.pack("<I", len(p.rlimits))
    for number, soft, hard in p.rlimits:
        out += struct.pack("<IQQ", number, soft & (1 << 64) - 1, hard & (1 << 64) - 1)
    seccomp = p.seccomp or b""
    out += struct.pack("<I", len(seccomp)) + seccomp

    def strings(items: Sequence[str]) -> bytes:
        return struct.pack("<I", len(items)) + b"".join(_string(s) for s in items)

    out += strings(p.args) + strings([f"{k}={v}" for k, v in env.items()]) + _string(p.cwd) + _string(search)
    return bytes(out) if len(out) <= EXECSTART_PLAN_LIMIT else None


def _string(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    return struct.pack("<I", len(data)) + data + b"\0"


def _start_execstart(blob: bytes, fds: Sequence[int]) -> int:
    """posix_spawn EXECSTART with `fds` (stdin, stdout, stderr, pidfd, cgroup.procs, report) as 0-5 and
    the plan `blob` on 6; returns its pid. Raises OSError."""
    plan_r, plan_w = os.pipe()
    try:
        os.set_blocking(plan_w, False)
        if os.write(plan_w, blob) != len(blob):
            raise OSError(errno.EAGAIN, "exec plan: short write")
        os.close(plan_w)
        plan_w = -1
        sources = [*fds, plan_r]
        high = max(sources) + 1  # out of 0-6's way first, so no dup2 overwrites a source still to come
        actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, fd, high + i) for i, fd in enumerate(sources)]
        actions += [(os.POSIX_SPAWN_DUP2, high + i, i) for i in range(len(sources))]
        actions += [(os.POSIX_SPAWN_CLOSE, high + i) for i in range(len(sources))]
        return os.posix_spawn(EXECSTART, ["pykata-execstart"], {}, file_actions=actions,
                              setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    finally:
        os.close(plan_r)
        if plan_w >= 0:
            os.close(plan_w)


def execstart_available() -> bool:
    return os.access(EXECSTART, os.X_OK)


async def spawn(p: ExecPlan, reaper: Reaper, *, stdin: int, stdout: int, stderr: int, timeout: float,
                spawner: Spawner | None = None, execstart: bool = False) -> tuple[int, asyncio.Future[ExitStatus]]:
    """Start the process; returns its pid (in the agent's pid namespace) and its exit future.

    With `execstart` (and a plan it can carry), EXECSTART does the child's work, started with
    posix_spawn: under TCG forking the agent and running the child's steps in Python were most of an
    exec's time (bench/exec_bench.py). Else the child is forked by `spawner` when it runs
    (agent/spawner.py: the agent then never forks), else by this process.

    Raises ProcessLookupError when the container's init is gone, ExecFailed when the program
    cannot be started (the message says why, as crun says it), OSError, TimeoutError.
    """
    pidfd = os.pidfd_open(p.init_pid)
    opened = [pidfd]
    report_r = -1
    try:
        cgroup_fd = os.open(p.cgroup_procs, os.O_WRONLY | os.O_CLOEXEC)
        opened.append(cgroup_fd)
        report_r, report_w = os.pipe()
        opened.append(report_w)
        generation = reaper.generation
        child_exit: asyncio.Future[ExitStatus] | None = None
        child_pidfd = -1
        forked = None
        blob = encode_plan(p) if execstart else None
        if blob is not None:
            pid = _start_execstart(blob, (stdin, stdout, stderr, pidfd, cgroup_fd, report_w))
            child_exit = reaper.watch(pid, since=generation)
        elif spawner is not None and spawner.running:
            with contextlib.suppress(SpawnerGone):  # not delivered: nothing forked, so fork here
                forked = await spawner.fork(p._asdict(), (
                    pidfd, cgroup_fd, stdin, stdout, stderr, report_w))
        if forked is not None:
            pid, child_pidfd = forked
        elif blob is None:
            pid = os.fork()
            if pid == 0:
                _child(p, pidfd, cgroup_fd, (stdin, stdout, stderr), report_w)
            child_exit = reaper.watch(pid, since=generation)
    except BaseException:
        if report_r >= 0:
            os.close(report_r)
        raise
    finally:
        for fd in opened:
            os.close(fd)
    try:
        # One write of a few bytes is atomic: the first read has the whole report, and the child
        # need not be waited for (the reaper collects it). No report: it died; its status says how.
        report = await _read_report(report_r, timeout)
        if not report and child_exit is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(child_exit)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            if child_pidfd >= 0:  # the spawner's child: by pidfd, never a reused pid
                signal.pidfd_send_signal(child_pidfd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(report_r)
        if child_pidfd >= 0:
            os.close(child_pidfd)
    status = child_exit.result().code if child_exit is not None and child_exit.done() else None
    started = started_pid(report, status)
    return started, reaper.watch(started, since=generation)


def started_pid(report: bytes, status: int | None = None) -> int:
    """The pid of a child's report "P<pid>", the only success; else the ExecFailed it says: "M<message>"
    (the program is missing), "E<message>", or nothing (the child died first: `status` is its exit
    status, if known). Anything else is refused, never parsed further: the report is a pipe's first read.

    Raises ExecFailed."""
    kind, text = report[:1], report[1:]
    if kind == b"P" and text.isascii() and text.isdigit() and len(text) <= 10 and 0 < int(text) < 1 << 22:
        return int(text)  # PID_MAX_LIMIT is 2**22
    if kind in (b"E", b"M") and text:
        raise ExecFailed(text.decode(errors="replace"), missing=kind == b"M")
    if not report:
        raise ExecFailed("exec failed: the starter ended without a report"
                         + (f" (exit status {status})" if status is not None else ""))
    raise ExecFailed(f"exec failed: the starter's report is not one: {report[:40]!r}")


class ActionFailed(PykataError):
    """An action run as a container's process (`act`) failed; `errno` is its OSError's, if any."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err
        self.rpc_code = Code.NOT_FOUND if err == errno.ENOENT else \
            Code.FAILED_PRECONDITION if err is not None else Code.INTERNAL


async def act(p: ExecPlan, reaper: Reaper, action: Callable[[], bytes], *, keep: Sequence[int] = (),
              timeout: float) -> bytes:
    """Run `action` in a child that is the container's process of plan `p` (as `spawn` makes it, but
    no program is started: `action` runs instead, with the agent's descriptors still open, and
    answers at most REPORT_LIMIT - 1 bytes). Of the agent's descriptors the child keeps only `keep`
    (and none leaks anyway: the child is in no pid namespace of the container, so none of its
    processes can reach it). The child is killed after `timeout` seconds.

    Raises ProcessLookupError when the container's init is gone, ActionFailed (the action raised or
    the child could not become the process), OSError, TimeoutError.
    """
    pidfd = os.pidfd_open(p.init_pid)
    opened = [pidfd]
    try:
        cgroup_fd = os.open(p.cgroup_procs, os.O_WRONLY | os.O_CLOEXEC)
        opened.append(cgroup_fd)
        report_r, report_w = os.pipe()
        opened.append(report_w)
        generation = reaper.generation
        pid = os.fork()
        if pid == 0:
            _act_child(p, pidfd, cgroup_fd, action, report_w, keep)
        child_exit = reaper.watch(pid, since=generation)
    finally:
        for fd in opened:
            os.close(fd)
    try:
        report = await _read_report(report_r, timeout)
        async with asyncio.timeout(timeout):
            await asyncio.shield(child_exit)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(report_r)
    if report.startswith(b"D"):
        return report[1:]
    if report.startswith(b"O"):
        number, _, text = report[1:].partition(b" ")
        return _raise_action(text.decode(errors="replace"), int(number) if number.isdigit() else None)
    return _raise_action(report[1:].decode(errors="replace") if report.startswith(b"E")
                         else f"the copy ended without an answer (status {child_exit.result().code})")


def _raise_action(message: str, err: int | None = None) -> NoReturn:
    raise ActionFailed(message, err)


def _drop_to_exec_capabilities(p: ExecPlan) -> None:
    """Keep only the capabilities the process would still have after execve(2) of a program without
    file capabilities: a non-root user keeps its ambient set alone (its effective set goes at exec),
    root what its inheritable and bounding sets allow (with no_new_privs, no more than it had). An
    action that runs without exec must never be more privileged than `cat` started by `spawn`."""
    allowed = sum(1 << cap for cap in p.ambient)
    if p.uid == 0:
        allowed |= p.inheritable | p.bounding
    if p.no_new_privileges:
        allowed &= p.permitted
    keep = p.effective & p.permitted & allowed
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = data[i].permitted = (keep >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = 0
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _act_child(p: ExecPlan, pidfd: int, cgroup_fd: int, action: Callable[[], bytes], report: int,
               keep: Sequence[int]) -> NoReturn:
    """In the forked child: never returns, never raises."""
    status = 1
    try:
        _enter(p, pidfd, cgroup_fd)
        _drop_to_exec_capabilities(p)
        low = 3
        for fd in sorted({*keep, report}):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        if p.seccomp is not None and p.no_new_privileges:
            _load_seccomp(p.seccomp)
        answer = action()
        os.write(report, b"D" + answer[:REPORT_LIMIT - 1])
        status = 0
    except OSError as exc:
        with contextlib.suppress(BaseException):
            text = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            os.write(report, (b"O%d " % (exc.errno or 0) + text.encode(errors="replace"))[:REPORT_LIMIT - 1])
    except BaseException as exc:  # the child must end here, whatever happened
        with contextlib.suppress(BaseException):
            os.write(report, b"E" + str(exc).encode(errors="replace")[:REPORT_LIMIT - 1])
    os._exit(status)


async def _read_report(fd: int, timeout: float) -> bytes:
    """The child's report (b"" when it exited without one)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, REPORT_LIMIT)
        except BlockingIOError:
            return
        data.extend(chunk)
        if not done.done():
            done.set_result(None)  # a whole report, or end of file

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            await done
    finally:
        loop.remove_reader(fd)
    return bytes(data)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _find_program(name: str, env: Sequence[str]) -> str | None:
    if "/" in name:
        return name
    path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
    for d in path.split(":"):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _enter(p: ExecPlan, pidfd: int, cgroup_fd: int) -> None:
    """In the forked child: become the container's process of plan `p` (steps 1-4 but seccomp
    with no_new_privs). Raises OSError, ExecFailed."""
    signal.set_wakeup_fd(-1)  # the agent's loop must not hear this child's signals
    # Nothing of the agent's may reach the container: all close on exec but the report pipe
    # (which closes when this child exits) and the stdio, dup'ed onto 0-2 by posix_spawn.
    _check(_libc.syscall(SYS_close_range, 3, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC), "close_range")
    os.write(cgroup_fd, b"0")
    _check(_libc.setns(pidfd, p.ns_flags), "setns")
    for number, soft, hard in p.rlimits:
        resource.setrlimit(number, (soft, hard))
    for cap in range(len(CAPABILITIES)):
        dropped = p.bounding >> cap & 1 or _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0
        if not dropped and ctypes.get_errno() != errno.EINVAL:  # EINVAL: the kernel lacks it
            _check(-1, f"dropping {CAPABILITIES[cap]} from the bounding set")
    if p.seccomp is not None and not p.no_new_privileges:
        _load_seccomp(p.seccomp)  # needs CAP_SYS_ADMIN, which the user change may take away
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")
    os.setgroups(list(p.groups))
    os.setresgid(p.gid, p.gid, p.gid)
    os.setresuid(p.uid, p.uid, p.uid)
    if p.umask is not None:  # unset: inherit the agent's, as crun does
        os.umask(p.umask)
    try:
        os.chdir(p.cwd)
    except OSError as exc:
        raise ExecFailed(f"chdir `{p.cwd}`: {exc.strerror}") from None
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (p.effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (p.permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (p.inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient capabilities")
    for cap in p.ambient:
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"raising ambient {CAPABILITIES[cap]}")
    if p.no_new_privileges:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _child(p: ExecPlan, pidfd: int, cgroup_fd: int, stdio: tuple[int, int, int], report: int) -> NoReturn:
    """In the forked child: never returns, never raises."""
    gc.disable()  # a collection would write to every page of the agent's heap: a fault each
    status = 1
    try:
        _enter(p, pidfd, cgroup_fd)
        env = list(p.env)
        if not any(e.startswith("HOME=") for e in env):
            env.append(f"HOME={_home(p.uid)}")  # as crun does
        program = _find_program(p.args[0], env)
        if program is None:
            os.write(report, b"M" + f"executable file `{p.args[0]}` not found in $PATH: "
                     "No such file or directory".encode()[:REPORT_LIMIT - 1])
            os._exit(1)
        if p.seccomp is not None and p.no_new_privileges:
            _load_seccomp(p.seccomp)
        try:
            pid = os.posix_spawn(program, list(p.args), dict(e.split("=", 1) for e in env if "=" in e),
                                 file_actions=[(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)],
                                 setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=())
        except OSError as exc:
            missing = exc.errno == errno.ENOENT
            text = f"exec `{p.args[0]}`: {exc.strerror}".encode()
            os.write(report, (b"M" if missing else b"E") + text[:REPORT_LIMIT - 1])
            os._exit(1)
        os.write(report, b"P%d" % pid)
        status = 0
    except ExecFailed as exc:
        with contextlib.suppress(OSError):
            os.write(report, b"E" + str(exc).encode(errors="replace")[:REPORT_LIMIT - 1])
    except BaseException as exc:  # the child must end here, whatever happened
        with contextlib.suppress(BaseException):
            os.write(report, b"E" + str(exc).encode(errors="replace")[:REPORT_LIMIT - 1])
    os._exit(status)


def _home(uid: int) -> str:
    """The user's home directory from the container's /etc/passwd (we are in its mount namespace),
    else "/"."""
    try:
        fd = os.open("/etc/passwd", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            text = os.read(fd, 1 << 20).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return "/"
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 6 and parts[2] == str(uid) and parts[5].startswith("/"):
            return parts[5]
    return "/"


def _load_seccomp(program: bytes) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def serve_spawner(sock: socket.socket) -> None:
    """The exec spawner's loop (agent/spawner.py): fork one exec child per request until the agent
    closes the socket."""
    import pickle  # here: the agent imports this module too, and only the spawner needs pickle

    while True:
        _reap()
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, REQUEST_FDS)
        except InterruptedError:
            continue
        if not msg:
            return  # the agent is gone
        try:
            if len(fds) != REQUEST_FDS:
                raise ValueError(f"{len(fds)} descriptors, not {REQUEST_FDS}")
            fields = pickle.loads(msg)  # the agent's own request (see the module doc)
            plan = ExecPlan(**fields)
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _child(plan, fds[0], fds[1], (fds[2], fds[3], fds[4]), fds[5])
            pidfd = os.pidfd_open(pid)
            try:
                socket.send_fds(sock, [b"P%d" % pid], [pidfd])
            finally:
                os.close(pidfd)
        except Exception as exc:  # the request is refused; the spawner serves on
            with contextlib.suppress(OSError):
                sock.send(b"E" + str(exc).encode(errors="replace")[:4000])
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _reap() -> None:
    """Collect exec children that ended (each ends right after its report)."""
    for _ in exited_children():
        pass


def spawner_main(argv: list[str]) -> int:
    """`python -m pykata.agent.nsexec FD AGENT_PID`: the exec spawner (agent/spawner.py)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(argv[2]):
        return 1  # the agent died before PDEATHSIG was set
    with socket.socket(fileno=int(argv[1])) as sock:
        sock.setblocking(True)
        serve_spawner(sock)
    return 0


if __name__ == "__main__":
    sys.exit(spawner_main(sys.argv))
