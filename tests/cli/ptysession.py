"""Run a command on a pseudo-terminal, as a person at a terminal would, for the CLI's tty tests."""

from __future__ import annotations

import os
import pty
import select
import time


def pty_session(argv: list[str], env: dict[str, str] | None = None, *, typed: bytes = b"",
                prompt: bytes = b"#", timeout: float = 120) -> tuple[int, bytes]:
    """Run `argv` on a new terminal and return its exit code and everything it printed there.

    `typed` is written once, after `prompt` first appears in the output (a shell's prompt).
    """
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(argv[0], argv, os.environ if env is None else env)
    out = b""
    sent = not typed
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if not r:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
        if not sent and prompt in out:
            os.write(fd, typed)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out
