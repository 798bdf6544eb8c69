"""The shim's log: logfmt lines into the `log` FIFO of the bundle, which containerd copies to its own
output. Each line names the sandbox and the container (the one the current RPC is about).

Writes never block: a FIFO containerd stopped reading (a containerd restart) would otherwise stall
the shim once the pipe is full; a line that does not fit is dropped and counted.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from pathlib import Path

current_container: contextvars.ContextVar[str] = contextvars.ContextVar("current_container", default="")

_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "fatal"}


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-._/:" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """time="..." level=info msg="..." runtime=pykata sandbox=<id> container=<id> pid=<shim pid>."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__()
        self.sandbox_id = sandbox_id

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        ts += f".{int(record.created % 1 * 1e6):06d}{time.strftime('%z', time.localtime(record.created))}"
        fields = [f'time="{ts}"', f"level={_LEVELS.get(record.levelname, 'info')}", f"msg={_quote(msg)}",
                  "runtime=io.containerd.pykata.v2", f"sandbox={_quote(self.sandbox_id)}"]
        container = current_container.get()
        if container:
            fields.append(f"container={_quote(container)}")
        fields.append(f"pid={os.getpid()}")
        return " ".join(fields)


class FifoHandler(logging.Handler):
    """Writes each record as one line to a descriptor opened non-blocking; drops what does not fit."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
            os.write(self.fd, line[:65536])
        except (BlockingIOError, BrokenPipeError):
            self.dropped += 1
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().close()


def open_log_fifo(bundle: Path) -> int | None:
    """The write end of <bundle>/log, or None when there is none or nobody reads it (O_NONBLOCK
    makes the open fail instead of waiting for a reader)."""
    try:
        return os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def setup_logging(fd: int | None, sandbox_id: str, *, debug: bool) -> None:
    """Route the `pykata` loggers to `fd` (or stderr) in logfmt."""
    handler: logging.Handler = FifoHandler(fd) if fd is not None else logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter(sandbox_id))
    root = logging.getLogger("pykata")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
