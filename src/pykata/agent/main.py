"""Agent entry point: parse arguments, register services, serve the host channel."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pykata.agent.channel import DEFAULT_PORT_NAME, ChannelError, parse_channel, serve_serial, serve_vsock
from pykata.agent.health import HealthService
from pykata.protocols.agent import HEALTH_SERVICE
from pykata.ttrpc import Server

log = logging.getLogger("pykata.agent")

# Written to the console once the agent serves: boot benchmarks and the VM tests look for it.
READY_LINE = "PYKATA_AGENT_READY"


def build_server() -> Server:
    """A ttrpc server with every service the agent offers."""
    server = Server()
    server.register(HEALTH_SERVICE, HealthService())
    return server


async def run(channel_spec: str) -> None:
    """Serve until cancelled. Raises ChannelError when the channel is unusable."""
    channel = parse_channel(channel_spec)
    server = build_server()
    ready = asyncio.Event()
    if channel.kind == "vsock":
        serving = asyncio.ensure_future(serve_vsock(server, channel.port, ready))
    else:
        serving = asyncio.ensure_future(serve_serial(server, channel.device, ready))
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        where = f"vsock port {channel.port}" if channel.kind == "vsock" else channel.device
        log.info("serving on %s", where)
        print(READY_LINE, flush=True)
    try:
        await serving
    finally:
        waiter.cancel()
        await server.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pykata-agent", description="pykata guest agent")
    parser.add_argument("--channel", default=f"serial:{DEFAULT_PORT_NAME}",
                        help="device path, serial:<virtio port name> or vsock:<port>")
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; returns the exit status (as PID 1, returning ends the VM)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="pykata-agent: %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(args.channel))
    except ChannelError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
