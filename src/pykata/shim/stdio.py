"""A task's stdio as containerd hands it to a shim: FIFO paths, `file://` and `binary://` URIs.

containerd (through `ctr` or CRI) makes the FIFOs and opens its own ends asynchronously. The shim
side opens them so that no open ever blocks the event loop:
- an output FIFO is opened O_RDWR: on Linux that never waits for a reader, and holding both ends
  means a reader that comes and goes does not turn our writes into EPIPE (runc's shim keeps a read
  end open for the same reason). containerd sees end of stream when we close, the only writer.
  An exec's output FIFO is closed only once its reader took what is in it (FIFO_DRAIN_TIMEOUT at
  most): a FIFO's bytes are gone when its last descriptor closes, and containerd's client opens its
  end in a goroutine that it cancels right after the exec's Delete (containerd/cio, fifo.OpenFifo),
  so under CPU load `ctr task exec` printed nothing for an exec whose output we had already written.
- the stdin FIFO is opened O_RDONLY|O_NONBLOCK and read when epoll says so; a FIFO reports hang-up
  only after a writer came and went, so a read of 0 bytes after readiness is the real end of input.
`file://PATH` appends stdout and stderr to PATH. `binary://PATH?k=v` starts PATH as containerd's
shims do: env CONTAINER_ID/CONTAINER_NAMESPACE only, fd 3/4 = stdout/stderr readers, fd 5 = a pipe
it closes (or writes to) when ready; at the end it gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import sys
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pykata.agentapi import AgentReplyError
from pykata.errors import InvalidArgument, PykataError
from pykata.sandbox.process import Process, Stream
from pykata.timing import mark

log = logging.getLogger("pykata.shim.stdio")

READ_CHUNK = 64 * 1024
# How long an exec's first WaitProcess may hold its output back: a short exec (a probe, CRI ExecSync)
# ends within it and needs no ReadStdout/ReadStderr round trips; a long one streams after it.
EXIT_WITH_OUTPUT_MS = 500
LOGGER_READY_TIMEOUT = 10.0
LOGGER_TERM_TIMEOUT = 12.0  # containerd's binaryIOProcTermTimeout
# How long an exec's output FIFO stays open after the end of the output while its reader has not taken
# all of it (a Delete closes it after its own IO_DRAIN_TIMEOUT in any case).
FIFO_DRAIN_TIMEOUT = 5.0
_DRAIN_POLL_MAX = 0.05


@dataclass(frozen=True)
class Stdio:
    """What containerd asked for (paths or URIs; "" = none)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Writer:
    """An output descriptor written without blocking the loop; shared by streams until each closed it."""

    def __init__(self, fd: int, *, users: int = 1, on_close: Callable[[], None] | None = None,
                 fifo: bool = False) -> None:
        self.fd = fd
        self.users = users
        self._on_close = on_close
        self.fifo = fifo  # a FIFO we hold O_RDWR (see `drained`)
        os.set_blocking(fd, False)

    async def write(self, data: bytes) -> None:
        """Write all of `data`; waits while the pipe is full. Raises OSError (EPIPE, EBADF)."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self.fd, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(self.fd)

    def unread(self) -> int:
        """Bytes written to a FIFO that its reader has not taken yet (0 for anything else)."""
        if not self.fifo or self.users <= 0:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)
        except OSError:
            return 0

    async def drained(self, timeout: float) -> None:
        """For the last user of a FIFO: wait (at most `timeout` seconds) until the reader took all
        that is in it. We hold the FIFO O_RDWR, so what we wrote outlives a reader that has not opened
        its end yet only while we keep it open."""
        if self.users != 1:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.001
        while self.unread() > 0 and loop.time() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, _DRAIN_POLL_MAX)

    def release(self) -> None:
        """One user is done; the last one closes the descriptor. Idempotent past zero."""
        self.users -= 1
        if self.users == 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            if self._on_close is not None:
                self._on_close()


class _Discard(Writer):
    def __init__(self, users: int = 1) -> None:
        self.fd = -1
        self.users = users
        self._on_close = None
        self.fifo = False

    async def write(self, data: bytes) -> None:
        return None

    def release(self) -> None:
        self.users -= 1


def _scheme(uri: str) -> tuple[str, str, str]:
    """(scheme, path, query) of an stdio URI; a bare path is a FIFO."""
    if "://" not in uri:
        return "fifo", uri, ""
    parts = urlsplit(uri)
    return parts.scheme, parts.path, parts.query


def _open_output(path: str, field: str) -> Writer:
    """Open a FIFO (O_RDWR: never blocks) or append to a file. Raises InvalidArgument."""
    try:
        st = os.stat(path)
        if stat.S_ISFIFO(st.st_mode):
            return Writer(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC), fifo=True)
        return Writer(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
    except OSError as e:
        raise InvalidArgument(field, f"cannot open {path}: {e.strerror}") from None


class ProcessIO:
    """Moves one process's stdio between the agent and what containerd gave. Make it with `open()`,
    connect it with `attach()`, end it with `close()` (idempotent)."""

    def __init__(self, stdio: Stdio) -> None:
        self.stdio = stdio
        self._out: Writer | None = None
        self._err: Writer | None = None
        self._stdin_fd: int | None = None
        self._logger: _Child | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._feeder: asyncio.Task[None] | None = None
        self._stdin_closing = asyncio.Event()
        self._proc: Process | None = None
        self._first_wait: asyncio.Future[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, stdio: Stdio, *, container_id: str, namespace: str) -> ProcessIO:
        """Open the FIFOs/files or start the logging binary.

        Raises InvalidArgument naming the stdio field that cannot be used.
        """
        pio = cls(stdio)
        try:
            await pio._open(container_id, namespace)
        except BaseException:
            await pio.close()
            raise
        return pio

    async def _open(self, container_id: str, namespace: str) -> None:
        s = self.stdio
        scheme, path, query = _scheme(s.stdout)
        if not s.stdout:
            self._out = _Discard()
        elif scheme == "fifo":
            self._out = _open_output(path, "stdout")
        elif scheme == "file":
            if not path.startswith("/"):
                raise InvalidArgument("stdout", f"file URI {s.stdout!r} needs an absolute path")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise InvalidArgument("stdout", f"cannot open {path}: {e.strerror}") from None
            self._out = Writer(fd, users=2)
            self._err = self._out
        elif scheme == "binary":
            await self._start_logger(path, query, container_id, namespace)
        else:
            raise InvalidArgument("stdout", f"unknown stdio scheme {scheme!r} in {s.stdout!r}")
        if self._err is None:
            if s.terminal or not s.stderr:
                self._err = _Discard()
            elif s.stderr == s.stdout and isinstance(self._out, Writer) and not isinstance(self._out, _Discard):
                self._out.users += 1
                self._err = self._out
            else:
                escheme, epath, _ = _scheme(s.stderr)
                if escheme != "fifo":
                    raise InvalidArgument("stderr", f"{s.stderr!r}: only a FIFO or the stdout URI")
                self._err = _open_output(epath, "stderr")
        if s.stdin:
            try:
                self._stdin_fd = os.open(s.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise InvalidArgument("stdin", f"cannot open {s.stdin}: {e.strerror}") from None

    async def _start_logger(self, path: str, query: str, container_id: str, namespace: str) -> None:
        if not path.startswith("/") or not os.access(path, os.X_OK):
            raise InvalidArgument("stdout", f"logging binary {path!r} is not an executable absolute path")
        args: list[str] = [path]
        for k, v in parse_qsl(query, keep_blank_values=True):
            args.append(k)
            if v:
                args.append(v)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        # copies above 5, so that placing them at 3, 4, 5 cannot overwrite one not yet placed
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (out_r, err_r, ready_w)]
        try:
            actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, n, os.devnull, os.O_RDWR, 0)
                                              for n in (0, 1, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, fd, n) for fd, n in zip(high, (3, 4, 5), strict=True)]
            pid = os.posix_spawn(path, args, {"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace},
                                 file_actions=actions, setsid=True)
        except OSError as e:
            for fd in (out_w, err_w, ready_r):
                os.close(fd)
            raise InvalidArgument("stdout", f"cannot start logging binary {path}: {e.strerror}") from None
        finally:
            for fd in (*high, out_r, err_r, ready_w):
                os.close(fd)
        self._logger = _Child(pid)
        self._out = Writer(out_w)
        self._err = Writer(err_w)
        try:
            await asyncio.wait_for(_readable(ready_r), LOGGER_READY_TIMEOUT)
        except TimeoutError:
            raise InvalidArgument("stdout", f"logging binary {path} not ready within "
                                                 f"{LOGGER_READY_TIMEOUT:.0f}s") from None
        finally:
            os.close(ready_r)

    # -- running ----------------------------------------------------------------------------------

    def attach(self, proc: Process) -> None:
        """Start copying `proc`'s output out and containerd's stdin in."""
        if self._closed or self._proc is not None:
            return
        self._proc = proc
        assert self._out is not None and self._err is not None
        if self._stdin_fd is None and not proc.terminal and proc.exec_id and proc.output_within:
            self._first_wait = asyncio.get_running_loop().create_future()
            self._pumps.append(asyncio.ensure_future(
                self._exit_with_output(proc, self._out, self._err, self._first_wait)))
            self._out = self._err = None
            return
        self._pumps.append(asyncio.ensure_future(self._pump(proc, "stdout", self._out)))
        if proc.terminal:
            self._err.release()
        else:
            self._pumps.append(asyncio.ensure_future(self._pump(proc, "stderr", self._err)))
        self._err = None
        self._out = None
        if self._stdin_fd is not None:
            self._feeder = asyncio.ensure_future(self._feed(proc, self._stdin_fd))
            self._stdin_fd = None

    async def waiting_allowed(self) -> None:
        """Returns once the process's exit may be waited for with a plain WaitProcess: after the
        first WaitProcess that carries output was answered (a plain one sent before it would take
        the exit and leave the output unread)."""
        if self._first_wait is not None:
            await asyncio.shield(self._first_wait)

    async def _exit_with_output(self, proc: Process, out: Writer, err: Writer, first: asyncio.Future[None]) -> None:
        """An exec without stdin or terminal: its exit and what it printed in one WaitProcess when it
        ends within EXIT_WITH_OUTPUT_MS (else the output so far), then the streams not at their end
        are pumped as usual."""
        sinks: dict[Stream, Writer] = {"stdout": out, "stderr": err}
        ended: list[Writer] = []  # at their end: released once their reader took the rest (_finish)
        pumps: list[Awaitable[None]] = []
        try:
            exited = None
            try:
                exited = await proc.wait_with_output(within_ms=EXIT_WITH_OUTPUT_MS)
            except PykataError as e:  # refused by the policy, or the VM is gone: the pumps see it too
                log.debug("exit with output of %s/%s: %s", proc.container_id, proc.exec_id, e)
            finally:
                first.set_result(None)
            got: list[tuple[Stream, bytes | None, bool]] = [
                ("stdout", exited.stdout, exited.stdout_eof), ("stderr", exited.stderr, exited.stderr_eof),
            ] if exited else []
            for stream, data, eof in got:
                if data:
                    try:
                        await sinks[stream].write(data)
                    except OSError as e:  # the pump, if any, drains the rest
                        log.warning("%s of %s/%s: %s", stream, proc.container_id, proc.exec_id, e)
                if eof:
                    mark(f"io.{stream}.end")
                    ended.append(sinks.pop(stream))
            pumps = [*(self._pump(proc, stream, sinks.pop(stream)) for stream in list(sinks)),
                     *(_finish(sink) for sink in ended)]
            ended = []
        finally:
            for sink in [*sinks.values(), *ended]:  # cancelled (close()) before a pump owned it
                sink.release()
        if pumps:
            await asyncio.gather(*pumps)

    async def _pump(self, proc: Process, stream: Stream, sink: Writer) -> None:
        ended = False  # not cancelled (close()): an exec's FIFO then waits for its reader
        try:
            while (data := await proc.read(stream)) is not None:
                await sink.write(data)
            ended = True
        except PykataError as e:  # the process or the VM is gone: the stream is over
            log.debug("%s of %s/%s ended: %s", stream, proc.container_id, proc.exec_id, e)
            ended = True
        except OSError as e:  # containerd's end is gone for good; keep draining so the process never blocks
            log.warning("%s of %s/%s: %s; discarding the rest", stream, proc.container_id, proc.exec_id, e)
            with contextlib.suppress(PykataError):
                while await proc.read(stream) is not None:
                    pass
        finally:
            mark(f"io.{stream}.end")
            if ended and proc.exec_id:
                await _finish(sink)
            else:
                sink.release()

    async def _feed(self, proc: Process, fd: int) -> None:
        loop = asyncio.get_running_loop()
        closing = asyncio.ensure_future(self._stdin_closing.wait())
        try:
            while True:
                ready = loop.create_future()
                loop.add_reader(fd, _wake, ready)
                try:
                    await asyncio.wait([ready, closing], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    loop.remove_reader(fd)
                    ready.cancel()
                data = _read_nonblocking(fd)
                if data is None:  # nothing yet
                    if closing.done():
                        break
                    continue
                if not data:
                    break
                await proc.write_stdin(data)
            await proc.close_stdin()
        except PykataError as e:
            # a reply out of contract (e.g. stdin acknowledged piecemeal, cut off) is the guest's doing
            (log.warning if isinstance(e, AgentReplyError) else log.debug)(
                "stdin of %s/%s: %s", proc.container_id, proc.exec_id, e)
            # What cannot be delivered ends the stream: the process sees the end of its stdin
            # instead of waiting for input that will never come (e.g. an agent's WriteStdin answer
            # was refused).
            with contextlib.suppress(PykataError):
                await proc.close_stdin()
        finally:
            closing.cancel()
            os.close(fd)

    async def close_stdin(self) -> None:
        """containerd's CloseIO: send what containerd already wrote, then close the process's stdin."""
        self._stdin_closing.set()
        if self._feeder is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._feeder), 5.0)
        # Not attached yet (containerd may close stdin before Start): the feeder, once attached,
        # sends what is in the FIFO and then closes the process's stdin, since `_stdin_closing` is
        # set. Closing the FIFO here instead lost both, and the process waited for stdin forever.

    async def wait_output(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until stdout and stderr have reached their end."""
        if self._pumps:
            await asyncio.wait(self._pumps, timeout=timeout)

    async def close(self) -> None:
        """Stop copying and close everything (the logging binary gets SIGTERM). Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._pumps, *([self._feeder] if self._feeder else [])]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for w in (self._out, self._err):
            if w is not None:
                while w.users > 0:
                    w.release()
        if self._stdin_fd is not None:
            os.close(self._stdin_fd)
            self._stdin_fd = None
        if self._logger is not None:
            await self._logger.stop(LOGGER_TERM_TIMEOUT)


async def _finish(sink: Writer) -> None:
    """Release an exec's output once containerd's reader took what is still in the FIFO (see the
    module's docstring), FIFO_DRAIN_TIMEOUT at most; at once when cancelled."""
    try:
        await sink.drained(FIFO_DRAIN_TIMEOUT)
    finally:
        sink.release()


def _read_nonblocking(fd: int) -> bytes | None:
    """Bytes, b"" at end of input, or None when nothing is there yet."""
    try:
        return os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EINTR):
            return None
        return b""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class _Child:
    """A process we spawned (not through asyncio's child watcher), reaped through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            await _readable(self._pidfd)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
        return self.returncode

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; reaps it. Idempotent."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            await self.wait()
