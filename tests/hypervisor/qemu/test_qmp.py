"""QmpChannel against a fake QMP server (named as such): serialization, deadlines, abort, events.

The same properties are checked against real QEMU in test_hypervisor_vm.py; the fake makes the error
paths (a server that never answers, one that vanishes) deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.hypervisor.errors import QmpError
from pykata.hypervisor.qemu.qmp import QmpChannel, QmpEvent


class FakeQmpServer:
    """Speaks enough QMP for QMPClient: greeting, qmp_capabilities, and test commands:
    `echo` (answers after a short sleep), `hang` (never answers), `boom` (an error reply),
    `emit` (sends an event, then answers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_flight = 0
        self.max_in_flight = 0
        self.commands: list[str] = []
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"},
                            "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\n")
        # QMP is a stream of JSON objects, not necessarily one per line.
        decoder = json.JSONDecoder()
        buf = ""
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while chunk := await reader.read(65536):
                buf += chunk.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    self.tasks.add(asyncio.ensure_future(self._answer(msg, writer)))

    async def _answer(self, msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
        cmd = str(msg.get("execute"))
        self.commands.append(cmd)
        reply: dict[str, object] = {"return": {}}
        if "id" in msg:
            reply["id"] = msg["id"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if cmd == "hang":
                await asyncio.sleep(3600)
            elif cmd == "echo":
                await asyncio.sleep(0.001)
                reply["return"] = {"value": msg.get("arguments", {})}  # type: ignore[union-attr]
            elif cmd == "boom":
                reply.pop("return")
                reply["error"] = {"class": "GenericError", "desc": "it went boom"}
            elif cmd == "emit":
                event = {"event": "STOP", "data": {"why": "test"},
                         "timestamp": {"seconds": 1, "microseconds": 500000}}
                writer.write(json.dumps(event).encode() + b"\n")
        finally:
            self.in_flight -= 1
        writer.write(json.dumps(reply).encode() + b"\n")


@pytest.fixture
async def fake() -> AsyncIterator[FakeQmpServer]:
    with tempfile.TemporaryDirectory(prefix="pkq") as d:
        server = FakeQmpServer(Path(d) / "qmp.sock")
        await server.start()
        yield server
        await server.close()


@pytest.fixture
async def channel(fake: FakeQmpServer) -> AsyncIterator[QmpChannel]:
    ch = QmpChannel(fake.path, name="test")
    await ch.connect(2.0)
    yield ch
    await ch.close()


async def test_concurrent_calls_are_serialized_and_routed(channel: QmpChannel, fake: FakeQmpServer) -> None:
    results = await asyncio.gather(*(channel.execute("echo", {"n": i}) for i in range(200)))
    assert [r["value"]["n"] for r in results] == list(range(200))
    # The server never saw two commands at once.
    assert fake.max_in_flight == 1


async def test_error_reply_is_qmp_error(channel: QmpChannel) -> None:
    with pytest.raises(QmpError) as info:
        await channel.execute("boom")
    assert info.value.command == "boom"
    assert info.value.error_class == "GenericError"
    assert "it went boom" in str(info.value)
    # The channel still works afterwards.
    assert await channel.execute("echo", {"x": 1}) == {"value": {"x": 1}}


async def test_timeout_then_next_call_still_works(channel: QmpChannel) -> None:
    started = time.monotonic()
    with pytest.raises(QmpError, match="no answer within"):
        await channel.execute("hang", timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert await channel.execute("echo", {"y": 2}, timeout=2) == {"value": {"y": 2}}


async def test_abort_fails_pending_and_queued_calls_at_once(channel: QmpChannel) -> None:
    hung = asyncio.ensure_future(channel.execute("hang", timeout=30))
    queued = [asyncio.ensure_future(channel.execute("echo", timeout=30)) for _ in range(5)]
    await asyncio.sleep(0.1)
    assert not hung.done()
    started = time.monotonic()
    channel.abort("VM exited with code -9")
    results = await asyncio.gather(hung, *queued, return_exceptions=True)
    assert time.monotonic() - started < 0.5
    assert all(isinstance(r, QmpError) and "code -9" in str(r) for r in results)
    with pytest.raises(QmpError, match="code -9"):
        await channel.execute("echo")


async def test_events_reach_callback(fake: FakeQmpServer) -> None:
    seen: list[QmpEvent] = []
    ch = QmpChannel(fake.path, name="ev", on_event=seen.append)
    await ch.connect(2.0)
    try:
        await ch.execute("emit")
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen and seen[0].name == "STOP"
        assert seen[0].data == {"why": "test"}
        assert seen[0].timestamp == 1.5
    finally:
        await ch.close()


async def test_server_vanishing_fails_calls(channel: QmpChannel, fake: FakeQmpServer) -> None:
    hung = asyncio.ensure_future(channel.execute("hang", timeout=10))
    await asyncio.sleep(0.05)
    await fake.close()
    with pytest.raises(QmpError):
        await asyncio.wait_for(hung, 3)


async def test_connect_gives_up_at_deadline() -> None:
    with tempfile.TemporaryDirectory(prefix="pkq") as d:
        ch = QmpChannel(Path(d) / "none.sock", name="nobody")
        started = time.monotonic()
        with pytest.raises(QmpError, match="no QMP server"):
            await ch.connect(0.3)
        assert time.monotonic() - started < 1.0
        await ch.close()


async def test_connect_stops_when_aborted() -> None:
    with tempfile.TemporaryDirectory(prefix="pkq") as d:
        ch = QmpChannel(Path(d) / "none.sock", name="nobody")
        task = asyncio.ensure_future(ch.connect(30))
        await asyncio.sleep(0.05)
        ch.abort("QEMU exited with code 1")
        with pytest.raises(QmpError, match="code 1"):
            await asyncio.wait_for(task, 1)
        await ch.close()
