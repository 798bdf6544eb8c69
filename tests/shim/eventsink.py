"""containerd's side of a shim's event channel (Events.Forward over ttrpc), for tests that start shims
themselves: `async with serve_events(path) as sink:` records every envelope the shim forwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from google.protobuf import empty_pb2

from pykata.protocols import EVENTS_SERVICE
from pykata.ttrpc import CallContext, Server


class EventSink:
    """Records each forwarded envelope; `arrived` is set at each one."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.arrived = asyncio.Event()

    async def Forward(self, request: Any, ctx: CallContext) -> empty_pb2.Empty:
        self.envelopes.append(request.envelope)
        self.arrived.set()
        return empty_pb2.Empty()


_Sink = TypeVar("_Sink", bound=EventSink)


@contextlib.asynccontextmanager
async def serve_events(sink: _Sink, path: str) -> AsyncIterator[_Sink]:
    """`sink` served as containerd's events service on the unix socket `path` until the block ends."""
    server = Server()
    server.register(EVENTS_SERVICE, sink)
    await server.serve_unix(path)
    try:
        yield sink
    finally:
        await server.close()
