"""A process the agent runs in a container (init or exec): its pid, stdio, exit status."""

from __future__ import annotations

import asyncio
import contextlib
import os

from pykata.agent.reaper import ExitStatus
from pykata.agent.stdio import DEFAULT_BUFFER_LIMIT, InputStream, OutputStream, set_window_size
from pykata.errors import FailedPrecondition, NotFound


class Process:
    """Stdio and lifetime of one container process.

    Made before crun runs (`child_stdio()` gives the descriptors crun passes on, or the console
    comes later via `attach_console`), then `started()` once the pid is known.
    """

    def __init__(self, container_id: str, exec_id: str, *, tty: bool,
                 buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.tty = tty
        self.pid = 0
        self.buffer_limit = buffer_limit
        self.stdin: InputStream | None = None
        self.stdout: OutputStream | None = None
        self.stderr: OutputStream | None = None
        self._console: int = -1
        self._child_fds: list[int] = []
        self._exit: asyncio.Future[ExitStatus] | None = None
        self.waited = False  # some WaitProcess got the exit status

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    # -- setup ---------------------------------------------------------------------------------

    def child_stdio(self) -> tuple[int, int, int]:
        """Make the stdin/stdout/stderr pipes; returns the child's ends (close with
        `close_child_stdio` once crun has started)."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._child_fds = [in_r, out_w, err_w]
        self.stdin = InputStream(in_w)
        self.stdout = OutputStream(out_r, limit=self.buffer_limit)
        self.stderr = OutputStream(err_r, limit=self.buffer_limit)
        return in_r, out_w, err_w

    def close_child_stdio(self) -> None:
        # The agent must not keep the child's ends: stdout would never reach end of file.
        for fd in self._child_fds:
            os.close(fd)
        self._child_fds = []

    def attach_console(self, master: int) -> None:
        """Use the pty master crun sent: output and input both go through it."""
        self._console = master
        self.stdin = InputStream(os.dup(master), tty=True)
        self.stdout = OutputStream(os.dup(master), limit=self.buffer_limit)

    def started(self, pid: int, exited: asyncio.Future[ExitStatus]) -> None:
        self.pid = pid
        self._exit = exited

    # -- queries and actions ------------------------------------------------------------------

    @property
    def has_started(self) -> bool:
        return self._exit is not None

    @property
    def exit_status(self) -> ExitStatus | None:
        if self._exit is not None and self._exit.done():
            return self._exit.result()
        return None

    @property
    def running(self) -> bool:
        return self._exit is not None and not self._exit.done()

    async def wait(self) -> ExitStatus:
        """The exit status, once the process has exited.

        Raises FailedPrecondition when the process never started.
        """
        if self._exit is None:
            raise FailedPrecondition(f"process {self.name} has not been started")
        status = await asyncio.shield(self._exit)
        self.waited = True
        return status

    @property
    def finished(self) -> bool:
        """Exited, waited for, and all output handed over: nothing is left to ask about it."""
        return (self.exit_status is not None and self.waited
                and all(s is None or s.drained for s in (self.stdout, self.stderr)))

    def signal(self, signum: int) -> None:
        """Raises NotFound when the process has already exited."""
        # The agent reaps its children itself, so until it has reaped this pid it cannot have
        # been reused by another process.
        if not self.running:
            raise NotFound(f"process {self.name} is not running")
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            raise NotFound(f"process {self.name} is not running") from None

    def resize(self, rows: int, columns: int) -> None:
        """Raises FailedPrecondition when the process has no terminal."""
        if self._console < 0:
            raise FailedPrecondition(f"process {self.name} has no terminal")
        set_window_size(self._console, rows, columns)

    def close(self) -> None:
        """Release every descriptor (buffered output is dropped). Idempotent."""
        self.close_child_stdio()
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self._console >= 0:
            with contextlib.suppress(OSError):
                os.close(self._console)
            self._console = -1
