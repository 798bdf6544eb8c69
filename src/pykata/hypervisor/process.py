"""Owned child processes: started with asyncio, always reaped, stopped with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path


class ChildProcess:
    """A child process this object owns: `wait()` reaps it, `kill()` ends it within a deadline."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._waiter = asyncio.ensure_future(proc.wait())

    @classmethod
    async def spawn(cls, argv: Sequence[str], *, name: str, log_path: Path,
                    pass_fds: Sequence[int] = ()) -> ChildProcess:
        """Start `argv` with stdin from /dev/null and stdout+stderr appended to `log_path`.

        The child gets its own session so a terminal's Ctrl-C reaches the runtime, which then stops it
        in order, instead of killing QEMU under a running guest.

        Raises:
            OSError: the binary cannot be executed.
        """
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                pass_fds=tuple(pass_fds), start_new_session=True, close_fds=True,
            )
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
        """SIGKILL and reap. A killed process is gone within milliseconds; the wait is still bounded."""
        self.send_signal(signal.SIGKILL)
        code = await self.wait(10.0)
        if code is None:
            # Unkillable (D state in the kernel): nothing more a user-space runtime can do.
            raise TimeoutError(f"{self.name} (pid {self.pid}) did not die after SIGKILL")
        return code


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
