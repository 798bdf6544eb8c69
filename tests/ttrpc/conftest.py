from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pykata.errors import NotFound
from pykata.ttrpc import CallContext, Server, connect_unix
from tests.ttrpc.echo_pb import ECHO_SERVICE, Echo


class EchoHandler:
    def __init__(self) -> None:
        self.seen_metadata: list[dict[str, list[str]]] = []
        self.cancelled = 0
        self.release = asyncio.Event()

    async def Echo(self, req: Any, ctx: CallContext) -> Any:
        self.seen_metadata.append(ctx.metadata)
        if req.delay_ms:
            await asyncio.sleep(req.delay_ms / 1000)
        return Echo(data=req.data, tag=req.tag)

    async def Fail(self, req: Any, ctx: CallContext) -> Any:
        raise NotFound(f"no {req.data.decode()}")

    async def Sleep(self, req: Any, ctx: CallContext) -> Any:
        try:
            await asyncio.sleep(req.delay_ms / 1000)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return Echo(tag=int((ctx.timeout or 0) * 1000))

    async def Fill(self, req: Any, ctx: CallContext) -> Any:
        return Echo(data=bytes(req.tag), tag=req.tag)

    async def Count(self, req: Any, ctx: CallContext) -> AsyncIterator[Any]:
        for i in range(req.tag):
            yield Echo(tag=i)

    async def Sum(self, reqs: AsyncIterator[Any], ctx: CallContext) -> Any:
        total = 0
        async for r in reqs:
            total += r.tag
        return Echo(tag=total)

    async def Hold(self, reqs: AsyncIterator[Any], ctx: CallContext) -> Any:
        """Client streaming that does not read its stream until told (`release` set)."""
        await self.release.wait()
        n = 0
        async for _ in reqs:
            n += 1
        return Echo(tag=n)

    async def Chat(self, reqs: AsyncIterator[Any], ctx: CallContext) -> AsyncIterator[Any]:
        async for r in reqs:
            yield Echo(data=r.data.upper(), tag=r.tag)


@pytest.fixture
async def echo_server(tmp_path: Path) -> AsyncIterator[tuple[str, EchoHandler, Server]]:
    handler = EchoHandler()
    server = Server()
    server.register(ECHO_SERVICE, handler)
    path = str(tmp_path / "echo.sock")
    await server.serve_unix(path)
    yield path, handler, server
    await server.close()


@pytest.fixture
async def echo_client(echo_server: tuple[str, EchoHandler, Server]) -> AsyncIterator[Any]:
    client = await connect_unix(echo_server[0])
    yield client
    await client.close()
