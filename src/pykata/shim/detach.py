"""The first steps of a pod's long-lived shim, in the child forked for it (by `start`, or by the fork
server): leave containerd's session and output, then serve."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pykata.shim.flags import Flags


def become_daemon(flags: Flags, listener: socket.socket, bundle: Path, sandbox_id: str,
                  path: Path) -> NoReturn:
    """In a child forked for the pod (by `start` or by the fork server): serve it. Never returns."""

    def serve() -> int:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        # containerd waits for end of file on start's output: the daemon must not keep it open
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        from pykata.shim.logs import open_log_fifo

        log_fd = open_log_fifo(bundle)
        os.dup2(log_fd if log_fd is not None else devnull, 2)
        os.close(devnull)
        os.chdir("/")
        # Lazy: the daemon's imports (Task service, sandbox, hypervisor) cost the short-lived `start`
        # and `delete` processes time they do not need; only the forked daemon pays it.
        from pykata.shim.daemon import run
        from pykata.timing import mark

        mark("daemon.imported")
        return run(flags, listener, bundle, sandbox_id, path, log_fd)

    exit_with(serve)


def exit_with(body: Callable[[], int]) -> NoReturn:
    """End this process (a forked shim: it must never return into its parent's stack) with `body()`'s
    exit code, 1 if it raised; whatever it raised is its last word, printed to stderr (the pod's log
    FIFO once `body` set it up), and os._exit runs on every path."""
    code = 1
    try:
        code = body()
    except BaseException:
        import traceback

        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)
