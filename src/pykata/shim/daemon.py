"""The long-lived shim: serves containerd's Task service on the socket `start` made, until Shutdown
(or SIGTERM); then stops the sandbox, sends the last events and exits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from pykata import tracing
from pykata.config import load_config
from pykata.errors import PykataError
from pykata.protocols import TASK_SERVICE
from pykata.sandbox import Sandbox
from pykata.shim.events import EventPublisher
from pykata.shim.flags import Flags
from pykata.shim.logs import setup_logging
from pykata.shim.service import TaskService
from pykata.timing import mark
from pykata.ttrpc import Server
from pykata.ttrpc.stats import PROCESS, RpcStats

log = logging.getLogger("pykata.shim")

EVENTS_FLUSH_TIMEOUT = 3.0
REPLY_TIMEOUT = 2.0


class InflightRpcs:
    """The service's RPC methods, counted while they run (Wait RPCs excepted: they end with their
    process, and a shim exits only when none is left)."""

    def __init__(self, handler: object, methods: Iterable[str], sandbox_id: str = "") -> None:
        self.count = 0
        self.sandbox_id = sandbox_id
        self._idle = asyncio.Event()
        self._idle.set()
        for name in methods:
            fn = getattr(handler, name)
            setattr(self, name, fn if name == "Wait" else self._counted(fn))

    def _counted(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        name = fn.__name__

        @functools.wraps(fn)
        async def call(request: Any, ctx: Any) -> Any:
            self.count += 1
            self._idle.clear()
            # bench/pod_phases.py: every task RPC, named with its task (and exec) id
            what = f"task.{name}@{getattr(request, 'id', '')}/{getattr(request, 'exec_id', '')}"
            mark(what)
            try:
                if tracing.enabled():  # one trace per task RPC: the sandbox's work, QMP and agent RPCs nest in it
                    with tracing.span(f"shim.{fn.__name__}", sandbox_id=self.sandbox_id,
                                      container_id=str(getattr(request, "id", ""))):
                        return await fn(request, ctx)
                return await fn(request, ctx)
            finally:
                mark(f"{what}.done")
                self.count -= 1
                if self.count == 0:
                    # the server writes the reply right after the handler returns, in the same step
                    asyncio.get_running_loop().call_soon(self._set_if_idle)
        return call

    def _set_if_idle(self) -> None:
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


def run(flags: Flags, listener: socket.socket, bundle: Path, sandbox_id: str, socket_path: Path,
        log_fd: int | None) -> int:
    """Serve until the shim is asked to end; returns the exit code."""
    setup_logging(log_fd, sandbox_id, debug=flags.debug)
    logging.getLogger("asyncio").handlers[:] = logging.getLogger("pykata").handlers
    return asyncio.run(serve(flags, listener, sandbox_id, socket_path))


def _start_tracing() -> None:
    """Tracing per the host's configuration file (already parsed by `start`, which forked us)."""
    try:
        runtime = load_config().runtime
    except PykataError as e:
        log.warning("tracing: %s", e)  # the pod's Create reports the configuration's error
        return
    if runtime.enable_tracing:
        tracing.setup(service="pykata-shim", endpoint=runtime.tracing_endpoint, file=runtime.tracing_file)


async def serve(flags: Flags, listener: socket.socket, sandbox_id: str, socket_path: Path,
                 warm: Sandbox | None = None, warm_netns: str | None = None,
                 on_first_start: Callable[[], None] | None = None) -> int:
    loop = asyncio.get_running_loop()
    _start_tracing()
    events = EventPublisher(os.environ.get("TTRPC_ADDRESS"), flags.namespace)
    events.start()

    def forget_socket() -> None:
        # a `start` or `delete` racing our exit must not find a socket nobody will answer
        with contextlib.suppress(OSError):
            socket_path.unlink()

    service = TaskService(sandbox_id, flags.namespace, events, on_exit=forget_socket, warm=warm,
                          warm_netns=warm_netns)
    service.on_first_start = on_first_start
    service.containerd_address = flags.address
    tracked = InflightRpcs(service, TASK_SERVICE.methods, sandbox_id)
    # counted for `pykata monitor` (the sandbox's agent proxy serves pykata.ttrpc.stats.PROCESS)
    PROCESS.served = RpcStats()
    PROCESS.counters["events_sent"] = lambda: events.sent
    PROCESS.counters["events_dropped"] = lambda: events.dropped
    server = Server(stats=PROCESS.served)
    server.register(TASK_SERVICE, tracked)
    await server.serve_socket(listener)
    mark("daemon.serving")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.exit_requested.set)
    log.info("shim serving on %s (namespace %s, events to %s)", socket_path, flags.namespace,
             os.environ.get("TTRPC_ADDRESS") or "nowhere")
    try:
        await service.exit_requested.wait()
        mark("daemon.exiting")
        forget_socket()
        await service.close()
        mark("daemon.closed")
        await events.close(EVENTS_FLUSH_TIMEOUT)
        mark("daemon.events.flushed")
        # the answer to the RPC that ended the shim (Shutdown, or a Delete) goes out before we hang up
        await tracked.wait_idle(REPLY_TIMEOUT)
    finally:
        await server.close()
        forget_socket()
        tracing.shutdown()  # flushes: the daemon ends with os._exit, which skips atexit
    log.info("shim exits")
    mark("daemon.exit")
    return 0
