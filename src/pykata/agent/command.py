"""Spawning helper programs (crun, modprobe) with os.posix_spawn and waiting through the reaper."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import cast

from pykata.agent.reaper import ExitStatus, Reaper
from pykata.errors import Code, PykataError
from pykata.record import Record

DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
CAPTURE_LIMIT = 64 << 10
ADDR_NO_RANDOMIZE = 0x0040000
_PERSONALITY_QUERY = 0xFFFFFFFF


class CommandTimeout(PykataError, TimeoutError):
    """A helper program did not finish in time (it has been killed)."""

    rpc_code = Code.DEADLINE_EXCEEDED


class Child(Record):
    __slots__ = ("exited", "pid")
    __match_args__ = ("pid", "exited")

    def __init__(self, pid: int, exited: asyncio.Future[ExitStatus]) -> None:
        self.pid = pid
        self.exited = exited


class CommandResult(Record):
    __slots__ = ("status", "stderr", "stdout")
    __match_args__ = ("status", "stdout", "stderr")

    def __init__(self, status: ExitStatus, stdout: bytes, stderr: bytes) -> None:
        self.status = status
        self.stdout = stdout
        self.stderr = stderr

    @property
    def ok(self) -> bool:
        return os.WIFEXITED(self.status.raw) and os.WEXITSTATUS(self.status.raw) == 0


@functools.cache
def _personality() -> Callable[[int], int]:
    fn = ctypes.CDLL(None, use_errno=True).personality
    fn.argtypes = [ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


@contextlib.contextmanager
def fixed_layout() -> Iterator[None]:
    """Programs spawned by this thread inside the block get no address-space randomization.

    QEMU 7.2's TCG finds the code it already translated by guest virtual address: a program whose
    libraries land at new random addresses on every run is translated anew each time, which under
    emulation is most of a short program's cost (crun: ~100 ms of each call, guest, Nov 2026, for
    its ten shared libraries). At fixed addresses each crun call reuses the code the previous one
    (or the warm pool's warm-up) translated. Only for the agent's own helpers: a container's
    processes get randomization back (crun applies linux.personality, which the agent always sets,
    before the workload's exec; see bundle.rewrite_spec).

    The persona is per thread (the kernel's task), so only what this thread spawns inside the block
    inherits it; it is restored on the way out. When the kernel refuses, programs are spawned as
    usual.
    """
    personality = _personality()
    old = personality(_PERSONALITY_QUERY)
    if old < 0 or old & ADDR_NO_RANDOMIZE or personality(old | ADDR_NO_RANDOMIZE) < 0:
        yield
        return
    try:
        yield
    finally:
        personality(old)


def _above_stdio(fd: int) -> int:
    # dup2 onto 0/1/2 in the child must not clobber a source that itself is 0/1/2.
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) if fd < 3 else fd


def spawn(reaper: Reaper, argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None, env: Mapping[str, str] | None = None, setsid: bool = True,
          executable: str | None = None, fixed: bool = False) -> Child:
    """Start `argv` (argv[0] an absolute path, or `executable` when given) with the given
    descriptors as its stdio (/dev/null for None), without address-space randomization when
    `fixed` (see fixed_layout: only for programs that run none of a container's code). The caller
    keeps ownership of the descriptors. Raises OSError when it cannot start.
    """
    opened: list[int] = []
    try:
        fds = []
        for fd in (stdin, stdout, stderr):
            if fd is None:
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                opened.append(fd)
            dup = _above_stdio(fd)
            if dup != fd:
                opened.append(dup)
            fds.append(dup)
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        generation = reaper.generation
        with fixed_layout() if fixed else contextlib.nullcontext():
            pid = os.posix_spawn(
                executable or argv[0], list(argv), dict(env if env is not None else DEFAULT_ENV),
                file_actions=actions, setsid=setsid,
                # Python ignores SIGPIPE and SIGXFSZ; exec keeps "ignored", so restore the defaults
                # or every container process would inherit them.
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setsigmask=(),
            )
        return Child(pid, reaper.watch(pid, since=generation))
    finally:
        for fd in opened:
            os.close(fd)


class _Collector:
    """Reads a pipe into a bounded buffer (the rest is drained and dropped) until end of file."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.data = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            room = self.limit - len(self.data)
            if room > 0:
                self.data += chunk[:room]
            return
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.done.done():
            self.done.set_result(None)


async def run(reaper: Reaper, argv: Sequence[str], *, timeout: float, stdin: int | None = None,
              env: Mapping[str, str] | None = None, capture_limit: int = CAPTURE_LIMIT,
              executable: str | None = None, fixed: bool = False) -> CommandResult:
    """Run `argv` to completion, capturing (bounded) stdout and stderr.

    Raises OSError when it cannot start and CommandTimeout (after SIGKILL) when it runs longer
    than `timeout` seconds.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        child = spawn(reaper, argv, stdin=stdin, stdout=out_w, stderr=err_w, env=env, executable=executable,
                      fixed=fixed)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    out, err = _Collector(out_r, capture_limit), _Collector(err_r, capture_limit)
    try:
        try:
            async with asyncio.timeout(timeout):
                status = await asyncio.shield(child.exited)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            raise CommandTimeout(f"{argv[0]} did not finish within {timeout}s") from None
        # A grandchild may hold the pipes open (e.g. a daemon); do not wait for it for long.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(out.done, err.done)
        return CommandResult(status, bytes(out.data), bytes(err.data))
    finally:
        out.close()
        err.close()
