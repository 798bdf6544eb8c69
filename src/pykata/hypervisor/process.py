"""Owned child processes: started with asyncio, always reaped, stopped with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVarTuple, Unpack

from pykata.hypervisor import fileguard, ksm, owned

_Ts = TypeVarTuple("_Ts")


class _PidfdWatcher(asyncio.AbstractChildWatcher):
    """Each child is watched through a pidfd by the loop that spawned it (what 3.12 does by itself).

    Python 3.11's default watcher starts one thread per child to wait for it: two per sandbox (QEMU
    and its file server), so a process with 20 sandboxes had 40 threads blocked in waitpid. 3.11's
    own PidfdChildWatcher serves a single loop, but the SDK's loop thread, a user's `asyncio.run` and
    the shim each have their own.
    """

    def add_child_handler(self, pid: int, callback: Callable[[int, int, Unpack[_Ts]], object],
                          *args: *_Ts) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, self._reap, loop, pid, pidfd, callback, args)

    @staticmethod
    def _reap(loop: asyncio.AbstractEventLoop, pid: int, pidfd: int, callback: Callable[..., object],
              args: tuple[Any, ...]) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped elsewhere: asyncio's convention for an unknown status
            code = 255
        callback(pid, code, *args)

    def remove_child_handler(self, pid: int) -> bool:
        return False

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        pass

    def close(self) -> None:
        pass

    def is_active(self) -> bool:
        return True

    def __enter__(self) -> _PidfdWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def watch_children_with_pidfds() -> None:
    """Python 3.11's asyncio waits for each child in a thread of its own: wait through pidfds on the
    loop instead (no thread per child). Call before asyncio.create_subprocess_exec."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(asyncio.get_child_watcher(), _PidfdWatcher):
            return
        try:
            os.close(os.pidfd_open(os.getpid()))
        except OSError:  # a kernel older than 5.3: keep the threaded watcher
            return
        asyncio.set_child_watcher(_PidfdWatcher())


_GUARDS: dict[object, Callable[[], None] | None] = {
    False: None, True: fileguard.guard_child, "filter": fileguard.filter_child}


class ChildProcess:
    """A child process this object owns: `wait()` reaps it, `kill()` ends it within a deadline."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._waiter = asyncio.ensure_future(proc.wait())

    @classmethod
    async def spawn(cls, argv: Sequence[str], *, name: str, log_path: Path, pass_fds: Sequence[int] = (),
                    serves_guest_files: Literal[False, "filter", True] = False,
                    log_fd: int | None = None, die_with_parent: bool = False,
                    preexec: Callable[[], None] | None = None, merge_memory: bool = False,
                    env: Mapping[str, str] | None = None) -> ChildProcess:
        """Start `argv` with stdin from /dev/null and stdout+stderr appended to `log_path` (or written
        to `log_fd`, e.g. a socket drained into a bounded log, when given).

        The child gets its own session so a terminal's Ctrl-C reaches the runtime, which then stops it
        in order, instead of killing QEMU under a running guest. `serves_guest_files`: the child
        writes files for the guest (virtiofsd, QEMU's 9p) and starts under pykata.hypervisor.fileguard
        ("filter": its seccomp filter only). `die_with_parent`: the child gets SIGKILL when the
        thread that spawned it ends (PR_SET_PDEATHSIG; see jail.lifeline_prefix).
        `preexec` runs in the child before exec in place of the guard (a confinement of its own, e.g.
        pykata.hypervisor.qemu.clonememory; not with serves_guest_files).
        `merge_memory`: the child offers all its memory to the host's KSM (pykata.hypervisor.ksm); without
        it a child of a process that offers its own (a shim with runtime.shim_mem_merge) does not.
        `env`: variables set in the child's environment on top of this process's.
        The child is recorded (pid and start time) in `log_path`'s directory (pykata.hypervisor.owned),
        so a cleanup after this process died ends exactly it.

        Raises:
            OSError: the binary cannot be executed, or the guard cannot be set up.
        """
        watch_children_with_pidfds()
        guard = _chain(ksm.child_step(merge_memory), preexec if preexec is not None else _GUARDS[serves_guest_files])
        with open(log_path, "ab") if log_fd is None else contextlib.nullcontext(log_fd) as log:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=tuple(pass_fds), start_new_session=True, close_fds=True,
                    env=None if env is None else {**os.environ, **env},
                    preexec_fn=_with_pdeathsig(guard) if die_with_parent else guard,
                )
            except subprocess.SubprocessError as exc:  # what a failing preexec_fn becomes
                raise OSError(errno.EPERM, f"{name}: file guard: {exc}") from None
        with contextlib.suppress(OSError):  # unrecorded, it is still ours to stop
            owned.record(log_path.parent, proc.pid)
        return cls(proc, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return not self._waiter.done()

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit (reaping it); return its code, or None if still running after `timeout`."""
        done, _ = await asyncio.wait({self._waiter}, timeout=timeout)
        return self._waiter.result() if done else None

    async def exit_code(self) -> int:
        """Wait, without a deadline, for the exit; return its code."""
        return await asyncio.shield(self._waiter)

    def send_signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def terminate(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code once reaped."""
        if self.running:
            self.send_signal(signal.SIGTERM)
            if await self.wait(grace) is not None:
                return self._waiter.result()
        return await self.kill()

    async def kill(self) -> int:
        """SIGKILL its process group (the child leads one: spawn's own session), then reap it. A killed
        process is gone within milliseconds; the wait is still bounded.

        The group, not only the child: a child killed right after its start may not yet have handed its
        death on. A lifeline wrapper (jail.lifeline_prefix) killed before its forked init had set the
        parent-death signal left that init and its program running, re-parented to the host's init
        (bench-free repro: spawn + kill at once, 40 of 200 left them). Its descendants are in its group
        (nothing below it makes a session of its own), and the group cannot be another's while the
        child is unreaped."""
        if self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self.send_signal(signal.SIGKILL)
        code = await self.wait(10.0)
        if code is None:
            # Unkillable (D state in the kernel): nothing more a user-space runtime can do.
            raise TimeoutError(f"{self.name} (pid {self.pid}) did not die after SIGKILL")
        return code


def _chain(first: Callable[[], None] | None, then: Callable[[], None] | None) -> Callable[[], None] | None:
    if first is None or then is None:
        return first or then

    def both() -> None:
        first()
        then()
    return both


def _with_pdeathsig(guard: Callable[[], None] | None) -> Callable[[], None]:
    def preexec() -> None:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if guard is not None:
            guard()
    return preexec


PR_SET_PDEATHSIG = 1


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
