"""The agent's end of the host channel: a virtio-serial port or a vsock listener.

A channel is named on the command line as a device path (`/dev/vport1p1`), `serial:<port name>`
(looked up under /sys/class/virtio-ports) or `vsock:<port>`.

Each host session's first bytes make the guest kernel reseed its CRNG before the first request is
read (`on_session`, pykata.agent.entropy.reseed_crng): a VM restored from a template or a snapshot
talks to its host only in a new session, so no two clones answer from their template's CRNG state.

On the virtio-serial port a host session begins with the host's hello (pykata.ttrpc.session): a host
that connects before the agent saw the last one leave (no end of file in between) still gets only
answers of its own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import select
import signal
import socket
from collections.abc import Callable

from pykata.agent.ports import DEFAULT_PORT_NAME, find_serial_port
from pykata.errors import PykataError
from pykata.record import Record
from pykata.ttrpc import Server

log = logging.getLogger("pykata.agent.channel")

DEFAULT_VSOCK_PORT = 1024
# A virtio-serial port reads as end-of-file while no host is connected. The agent keeps the port open
# for its whole life and waits for a host with O_ASYNC: the guest kernel sends SIGIO when a host connects
# (virtio_console), so the next host is served at once (_IDLE_RECHECK is only a fallback). It never
# closes the port: closing it discards what the guest holds of the port's input (virtio_console's
# release), and a host that connected and wrote just before the close lost those bytes for good: 17 of
# 150 plain quick reconnects (load 22) got no answer when the agent closed and reopened its port after
# each host's session (10..200 ms closed moments, once how restore() of a snapshot knew the guest left
# the saved host's session; the host's session hello does that now: pykata.ttrpc.session).
_IDLE_RECHECK = 1.0
# Printed on the console when a host's session ended (the agent believed its end of file): restore() of
# a snapshot, saved with its owner's session open, waits for it before its host connects, so the
# agent's parser starts afresh (a frame the saving host had half written is dropped, not completed
# by the new host's hello).
HOST_LEFT_LINE = "PYKATA_AGENT_HOST_LEFT"


class ChannelError(PykataError):
    """The channel argument is malformed or the device/socket cannot be opened."""


class Channel(Record):
    """Where the agent serves: `kind` is "serial" (a device path) or "vsock" (a port)."""

    __slots__ = ("device", "kind", "port")
    __match_args__ = ("kind", "device", "port")

    def __init__(self, kind: str, device: str = "", port: int = 0) -> None:
        self.kind = kind
        self.device = device
        self.port = port


def parse_channel(spec: str) -> Channel:
    """Parse the --channel argument.

    Raises ChannelError naming the bad value.
    """
    if spec.startswith("vsock:"):
        raw = spec.removeprefix("vsock:") or str(DEFAULT_VSOCK_PORT)
        if not raw.isdigit() or not 0 < int(raw) < 2**32:
            raise ChannelError(f"--channel: bad vsock port {raw!r}")
        return Channel("vsock", port=int(raw))
    if spec.startswith("serial:"):
        name = spec.removeprefix("serial:") or DEFAULT_PORT_NAME
        device = find_serial_port(name)
        if device is None:
            raise ChannelError(f"--channel: no virtio-serial port named {name!r}")
        return Channel("serial", device=device)
    if spec.startswith("/"):
        return Channel("serial", device=spec)
    raise ChannelError(f"--channel: expected a device path, serial:<name> or vsock:<port>, got {spec!r}")


async def serve_serial(server: Server, device: str, ready: asyncio.Event,
                       on_session: Callable[[], None] | None = None) -> None:
    """Serve ttrpc on a virtio-serial port for ever: one session per host, the port open throughout
    (see _IDLE_RECHECK: no host is waited for by SIGIO).

    `on_session` runs with each session's first bytes (a session that saw no bytes when the VM
    was saved still counts as new in a clone: its first bytes come from the clone's host).
    Raises ChannelError when the device cannot be opened.
    """
    loop = asyncio.get_running_loop()
    host_changed = asyncio.Event()
    loop.add_signal_handler(signal.SIGIO, host_changed.set)
    fd = _open_port(device)
    try:
        ready.set()
        while True:
            # No SIGIO while serving: the port signals every chunk of a host's data too, and a signal
            # per request costs the guest its delivery and a wakeup of the loop.
            _set_async(fd, False)
            try:
                served = await server.serve_fd(fd, resync=True, sessions=True, on_first_data=on_session,
                                               peer_present=functools.partial(_host_connected, fd))
            finally:
                _set_async(fd, True)
            if served:
                print(HOST_LEFT_LINE, flush=True)
            host_changed.clear()  # a host connecting from here on is signalled
            if _host_connected(fd):
                continue  # it came between the end of file and SIGIO's return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(host_changed.wait(), _IDLE_RECHECK)
    finally:
        os.close(fd)
        loop.remove_signal_handler(signal.SIGIO)


def _host_connected(fd: int) -> bool:
    """Whether the guest's kernel has a host on the port now (it reports POLLHUP while none is)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return not any(flags & select.POLLHUP for _, flags in p.poll(0))


def _set_async(fd: int, on: bool) -> None:
    """SIGIO on host (dis)connection and on data for the port (O_ASYNC), or none."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC if on else flags & ~os.O_ASYNC)


def _open_port(device: str) -> int:
    """Open the port with SIGIO to this process on host (dis)connection. Raises ChannelError."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ChannelError(f"cannot open agent channel {device}: {exc.strerror}") from exc
    try:
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    except OSError as exc:
        os.close(fd)
        raise ChannelError(f"agent channel {device}: cannot ask for SIGIO: {exc.strerror}") from exc
    return fd


async def serve_vsock(server: Server, port: int, ready: asyncio.Event,
                      on_session: Callable[[], None] | None = None) -> None:
    """Listen on vsock `port` (any CID) and serve connections until cancelled; `on_session` runs
    with each connection's first bytes.

    Raises ChannelError when the socket cannot be bound.
    """
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(16)
    except OSError as exc:
        raise ChannelError(f"cannot listen on vsock port {port}: {exc.strerror}") from exc
    sock.setblocking(False)
    listener = await server.serve_socket(sock, on_first_data=on_session)
    ready.set()
    await listener.serve_forever()
