"""Process stdio in the agent: bounded output buffers, stdin writers, the pty master from crun.

Output is pulled by the host (ReadStdout/ReadStderr). Each stream buffers at most `limit` bytes;
when the buffer is full the agent stops reading the pipe, the pipe fills and the writing process
blocks in write(2). So a process that writes faster than the host reads is slowed down, nothing is
dropped, and the agent's memory stays bounded whatever the process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import termios
from collections import deque

from pykata.errors import FailedPrecondition

DEFAULT_BUFFER_LIMIT = 1 << 20
_READ_CHUNK = 1 << 20


F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: each wake-up of the agent then moves up to 16x more output,
    which is what bounds stdout throughput under TCG (every loop iteration costs milliseconds)."""
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, F_SETPIPE_SZ, _PIPE_SIZE)


class OutputStream:
    """One output stream (a pipe's read end or a pty master) with a bounded buffer."""

    def __init__(self, fd: int, *, limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._limit = limit
        self._buf = bytearray()
        self._eof = False
        self._reading = False
        self._waiters: dict[asyncio.Future[None], None] = {}
        self._turns: deque[object] = deque()  # the reads waiting, in the order they were made
        self.total = 0  # bytes received from the process so far
        self.drained = False  # end of file was handed to a reader
        os.set_blocking(fd, False)
        _widen_pipe(fd)
        self._resume()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def paused(self) -> bool:
        """True while the buffer is full and the pipe is not being read (back-pressure)."""
        return not self._reading and not self._eof

    def _resume(self) -> None:
        if not self._reading and not self._eof and self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        if self._pull():
            self._wake()

    def _pull(self) -> bool:
        """One read of the pipe into the buffer (at most up to the limit); False when nothing came
        (nothing there now, or the buffer is full). End of file finishes the stream (and wakes)."""
        room = self._limit - len(self._buf)
        if room <= 0:
            self._pause()
            return False
        try:
            data = os.read(self._fd, min(room, _READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            # EIO: the pty's last slave descriptor closed, which is a pty's end of file.
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if not data:
            self._finish()
            return False
        self._buf += data
        self.total += len(data)
        if len(self._buf) >= self._limit:
            self._pause()
        return True

    def take_now(self, max_length: int) -> tuple[bytes, bool]:
        """Without waiting: up to `max_length` bytes of what the process printed (the pipe is read
        first: a process that has exited left all of its output there), and whether the stream ended
        after them. (b"", False) while reads are waiting: they were asked first."""
        if self._turns:
            return b"", False
        while not self._eof and self._fd >= 0 and len(self._buf) < max_length and self._pull():
            pass
        n = min(max_length, len(self._buf))
        with memoryview(self._buf) as view:
            data = bytes(view[:n])
        del self._buf[:n]
        if self._eof and not self._buf:
            self.drained = True
            return data, True
        self._resume()
        return data, False

    def _finish(self) -> None:
        self._pause()
        self._eof = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def read(self, max_length: int) -> tuple[bytes, bool]:
        """Up to `max_length` bytes as soon as any are there; (b"", True) once the stream ended.

        Concurrent reads (a host reading ahead) are served strictly in the order they were made:
        each waits for its turn, so the bytes go out in the order the host asked for them."""
        turn = object()
        self._turns.append(turn)
        try:
            while self._turns[0] is not turn or (not self._buf and not self._eof):
                fut = self._loop.create_future()
                self._waiters[fut] = None
                try:
                    await fut
                finally:
                    self._waiters.pop(fut, None)
            if self._buf:
                n = min(max_length, len(self._buf))
                with memoryview(self._buf) as view:  # one copy, not a slice and then a copy of it
                    data = bytes(view[:n])
                del self._buf[:n]
                self._resume()
                return data, False
            self.drained = True
            return b"", True
        finally:
            self._turns.remove(turn)
            if self._turns:
                self._wake()  # the next reader's turn

    async def wait_buffered(self, count: int) -> None:
        """Wait until the buffer holds `count` bytes (or is full: the process may then be blocked
        printing). Never returns for a stream that ends with less."""
        while len(self._buf) < min(count, self._limit):
            fut = self._loop.create_future()
            self._waiters[fut] = None
            try:
                await fut
            finally:
                self._waiters.pop(fut, None)

    async def wait_eof(self) -> None:
        """Wait until the process side closed (the buffer may still hold data)."""
        while not self._eof:
            fut = self._loop.create_future()
            self._waiters[fut] = None
            try:
                await fut
            finally:
                self._waiters.pop(fut, None)

    def close(self) -> None:
        """Stop reading and drop the buffer; readers get end of file. Idempotent."""
        self._buf.clear()
        self._finish()
        self.drained = True


class InputStream:
    """The write side of a process's stdin: a pipe, or the pty master (`tty`)."""

    def __init__(self, fd: int, *, tty: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._tty = tty
        self._lock = asyncio.Lock()
        os.set_blocking(fd, False)
        if not tty:
            _widen_pipe(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    async def write(self, data: bytes) -> int:
        """Write all of `data`, waiting while the process does not read; returns how many bytes were
        accepted: all of them, or fewer when stdin was closed or the process went away midway.
        (A caller whose chunk was only partly taken sends the rest again: with a 64 KiB pipe and
        1 MiB chunks that resending cost most of the stdin bandwidth.)

        Raises FailedPrecondition when stdin was closed or the process is gone before any
        byte was taken.
        """
        async with self._lock:
            view = memoryview(data)
            done = 0
            while done < len(view):
                if self._fd < 0:
                    if done:
                        return done
                    raise FailedPrecondition("stdin is closed")
                try:
                    done += os.write(self._fd, view[done:])
                except (BlockingIOError, InterruptedError):
                    await self._writable()
                except (BrokenPipeError, OSError) as exc:
                    if isinstance(exc, BrokenPipeError) or exc.errno in (errno.EIO, errno.EPIPE):
                        if done:
                            return done
                        raise FailedPrecondition("the process closed its stdin") from None
                    raise
            return done

    def write_now(self, data: bytes) -> int:
        """Write what the pipe takes now, without waiting; returns how many bytes it took (0 when
        it is full, stdin is closed, another write is under way or the process went away)."""
        if self._fd < 0 or self._lock.locked() or not data:
            return 0
        try:
            return os.write(self._fd, data)
        except OSError:  # full (EAGAIN), or the reader went away (EPIPE, EIO)
            return 0

    async def _writable(self) -> None:
        await _ready(self._fd, write=True)

    def close(self) -> None:
        """End the process's input: close the pipe; for a pty first send the terminal's EOF
        character. Idempotent."""
        if self._fd < 0:
            return
        if self._tty:
            with contextlib.suppress(OSError):
                eof = termios.tcgetattr(self._fd)[6][termios.VEOF]
                os.write(self._fd, eof if isinstance(eof, bytes) else bytes([eof]))
        # For a pty this is a duplicate of the master: output keeps flowing through the others.
        os.close(self._fd)
        self._fd = -1


async def _ready(fd: int, *, write: bool) -> None:
    """Wait until `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def set_window_size(fd: int, rows: int, columns: int) -> None:
    """TIOCSWINSZ on a pty master; the kernel sends SIGWINCH to the terminal's foreground group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def console_listener(path: str) -> socket.socket:
    """A unix socket for crun's --console-socket (crun connects and sends the pty master)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def receive_console(sock: socket.socket) -> int:
    """Accept crun's connection and take the pty master it sends (SCM_RIGHTS).

    Raises OSError when the peer sends no terminal descriptor.
    """
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(sock)
    with conn:
        conn.setblocking(False)
        while True:
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
                break
            except (BlockingIOError, InterruptedError):
                await _ready(conn.fileno(), write=False)
    if not fds:
        raise OSError(errno.EPROTO, "console socket: no descriptor received")
    master, extra = fds[0], fds[1:]
    for fd in extra:
        os.close(fd)
    os.set_inheritable(master, False)
    if not os.isatty(master):
        os.close(master)
        raise OSError(errno.ENOTTY, "console socket: received descriptor is not a terminal")
    return master
