"""What QEMU says is quoted bounded and escaped: QEMU runs the guest, so a guest that escapes into it
writes QMP's error descriptions, a migration's error-desc and a SHUTDOWN's reason, up to qemu.qmp's
64 KiB line, and they went raw into the errors containerd logs and CRI hands to kubelet's events.

A FAKE QMP server (tests/hypervisor/qemu/test_qmp.py's, with attack commands added) stands in for a
compromised QEMU: a real QEMU only answers with its own words."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata.errors import HypervisorError
from pykata.hypervisor.errors import QmpError
from pykata.hypervisor.qemu import migrate
from pykata.hypervisor.qemu.qmp import QmpChannel, QmpEvent
from tests.hypervisor.qemu.test_qmp import FakeQmpServer
from tests.hypervisor.test_vm import kernel, make_vm, workdir  # noqa: F401

# a forged line of the shim's log after a CR, a screen clear, a window title, a bidi override, then
# ~60 KiB (qemu.qmp reads lines of up to 64 KiB)
FORGED = ('booting\r\ntime="2026-12-01T00:00:00Z" level=info msg="PYKATA-FORGED-LINE"\r'
          '\x1b[2J\x1b[HPYKATA-FORGED-SCREEN\x1b]0;PWNED\x07\u202e' + "Q" * 60_000)


class ForgingQmpServer(FakeQmpServer):
    """FakeQmpServer, plus `forge` (an error reply whose desc and class are FORGED) and a
    query-migrate that says the migration failed, for FORGED."""

    async def _answer(self, msg: dict[str, object], writer: asyncio.StreamWriter) -> None:
        cmd = str(msg.get("execute"))
        if cmd == "forge":
            reply: dict[str, object] = {"error": {"class": FORGED[:200], "desc": FORGED}}
        elif cmd == "query-migrate":
            reply = {"return": {"status": "failed", "error-desc": FORGED}}
        else:
            return await super()._answer(msg, writer)
        if "id" in msg:
            reply["id"] = msg["id"]
        writer.write(json.dumps(reply).encode() + b"\n")


def _quotes_qemu_safely(text: str) -> None:
    assert len(text) < 3000, f"{len(text)} characters"  # 500 of QEMU's, the host's own words
    for raw in ("\x1b", "\r", "\n", "\x07", "\u202e"):
        assert raw not in text, repr(text[:300])
    assert "PYKATA-FORGED-LINE" in text  # still there to read, escaped


@pytest.fixture
async def channel() -> AsyncIterator[QmpChannel]:
    with tempfile.TemporaryDirectory(prefix="pkq") as d:
        server = ForgingQmpServer(Path(d) / "qmp.sock")
        await server.start()
        ch = QmpChannel(server.path, name="forged")
        try:
            await ch.connect(30.0)
            yield ch
        finally:
            await ch.close()
            await server.close()


async def test_an_error_reply_is_quoted_bounded_and_escaped(channel: QmpChannel) -> None:
    with pytest.raises(QmpError) as info:
        await channel.execute("forge")
    _quotes_qemu_safely(str(info.value))
    assert info.value.error_class is not None and len(info.value.error_class) < 600
    assert "\x1b" not in info.value.error_class
    assert await channel.execute("echo", {"x": 1}) == {"value": {"x": 1}}  # the channel goes on


async def test_a_failed_migrations_error_desc_is_quoted_bounded_and_escaped(channel: QmpChannel,
                                                                            tmp_path: Path) -> None:
    qemu_log = tmp_path / "qemu.log"
    qemu_log.write_text("qemu-system-x86_64: honest last words\n")
    with pytest.raises(HypervisorError) as info:
        await migrate.wait_completed(channel, "snapshot", label="VM forged", qemu_log=qemu_log)
    text = str(info.value)
    assert "snapshot failed" in text and "honest last words" in text, text[:300]
    _quotes_qemu_safely(text)


def test_a_shutdown_reason_is_quoted_bounded_and_escaped(make_vm, workdir: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The reason of the SHUTDOWN event QEMU sent goes into the VM's exit reason (the shim's log, the
    error of every call the VM's death fails). No VM is started: the event is the one QEMU would send."""
    vm = make_vm(workdir / "no-initrd")
    vm._handle_event(QmpEvent("SHUTDOWN", {"guest": True, "reason": FORGED}, 0.0))
    text = vm._exit_reason(0)
    assert text.startswith("exited with code 0 (shutdown: booting"), text[:300]
    _quotes_qemu_safely(text)
