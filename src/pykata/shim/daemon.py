"""The long-lived shim: serves containerd's Task service on the socket `start` made, until Shutdown
(or SIGTERM); then stops the sandbox, sends the last events and exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

from pykata.protocols import TASK_SERVICE
from pykata.shim.bootstrap import Flags
from pykata.shim.events import EventPublisher
from pykata.shim.logs import setup_logging
from pykata.shim.service import TaskService
from pykata.ttrpc import Server

log = logging.getLogger("pykata.shim")

EVENTS_FLUSH_TIMEOUT = 3.0


def run(flags: Flags, listener: socket.socket, bundle: Path, sandbox_id: str, socket_path: Path,
        log_fd: int | None) -> int:
    """Serve until the shim is asked to end; returns the exit code."""
    setup_logging(log_fd, sandbox_id, debug=flags.debug)
    logging.getLogger("asyncio").handlers[:] = logging.getLogger("pykata").handlers
    return asyncio.run(_serve(flags, listener, sandbox_id, socket_path))


async def _serve(flags: Flags, listener: socket.socket, sandbox_id: str, socket_path: Path) -> int:
    loop = asyncio.get_running_loop()
    events = EventPublisher(os.environ.get("TTRPC_ADDRESS"), flags.namespace)
    events.start()

    def forget_socket() -> None:
        # a `start` or `delete` racing our exit must not find a socket nobody will answer
        with contextlib.suppress(OSError):
            socket_path.unlink()

    service = TaskService(sandbox_id, flags.namespace, events, on_exit=forget_socket)
    server = Server()
    server.register(TASK_SERVICE, service)
    await server.serve_socket(listener)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.exit_requested.set)
    log.info("shim serving on %s (namespace %s, events to %s)", socket_path, flags.namespace,
             os.environ.get("TTRPC_ADDRESS") or "nowhere")
    try:
        await service.exit_requested.wait()
        forget_socket()
        await service.close()
        await events.close(EVENTS_FLUSH_TIMEOUT)
    finally:
        await server.close()
        forget_socket()
    log.info("shim exits")
    return 0
