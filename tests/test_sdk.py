"""The Python API: disposable VM sandboxes from code."""

from __future__ import annotations

import pytest

import pykata
from pykata.sdk import ExecTimeoutError

pytestmark = [pytest.mark.vm]


def test_sync_sandbox_exec_stream_and_timeout() -> None:
    with pykata.Sandbox(image="busybox") as sb:
        r = sb.exec(["sh", "-c", "echo hi; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"hi\n", b"err\n")
        assert sb.exec(["cat"], stdin=b"data in").stdout == b"data in"
        # state persists between execs: it is one VM and one container
        sb.exec(["sh", "-c", "echo kept > /tmp/f"])
        assert sb.exec(["cat", "/tmp/f"]).stdout == b"kept\n"
        items = list(sb.stream(["sh", "-c", "echo a; echo b >&2"]))
        assert ("stdout", b"a\n") in items and ("stderr", b"b\n") in items and items[-1] == ("exit", b"0")
        with pytest.raises(ExecTimeoutError):
            sb.exec(["sleep", "30"], timeout=1)
        sb_id = sb.id
    assert sb_id


async def test_async_sandbox() -> None:
    async with pykata.AsyncSandbox(image="busybox", env=["GREETING=hello"]) as sb:
        r = await sb.exec(["sh", "-c", "echo $GREETING"])
        assert r.ok and r.stdout == b"hello\n"


def test_unknown_image_raises_before_any_vm() -> None:
    with pytest.raises(pykata.PykataError, match="unknown image"), pykata.Sandbox(image="nope"):
        pass
