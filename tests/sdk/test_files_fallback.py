"""When the files API leaves the data disk for the stdio channel, and when it does not: unit tests
with a fake sandbox (FakeRunner) and a fake disk session (FakeDisk) standing in for the guest."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from pykata.agentapi.errors import AgentCallError
from pykata.errors import Code
from pykata.sdk import NotFoundError, SdkError
from pykata.sdk.files import AsyncFiles
from pykata.sdk.process import ExecResult


class FakeDisk:
    """A disk session whose every copy fails with `code`."""

    size = 1 << 20

    def __init__(self, code: Code, message: str) -> None:
        self.code, self.message = code, message
        self.calls = 0

    async def read_file(self, path: str, *, offset: int, length: int) -> Any:
        self.calls += 1
        raise AgentCallError("sb", "ReadFileToDisk", self.code, self.message)

    async def write_file(self, path: str, data: bytes, **kw: Any) -> Any:
        self.calls += 1
        raise AgentCallError("sb", "WriteFileFromDisk", self.code, self.message)


class FakeRunner:
    """A sandbox whose commands all answer `cat`'s output `stdout`, and whose disk is `disk`."""

    id = "sb"
    cwd = "/"

    def __init__(self, disk: FakeDisk) -> None:
        self.disk = disk
        self.commands: list[list[str]] = []

    async def run(self, cmd: Sequence[str], *, stdin: bytes | None = None, max_output: int = 0) -> ExecResult:
        self.commands.append(list(cmd))
        return ExecResult(0, b"through stdio", b"")

    async def spawn(self, cmd: Sequence[str], *, stdin: bool = False) -> Any:
        raise AssertionError("not used")

    def disk_session(self) -> Any:
        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[FakeDisk]:
            yield self.disk
        return session()


@pytest.mark.parametrize(("code", "message"), [
    (Code.UNIMPLEMENTED, "this container's processes are started by crun"),  # or an older agent
    (Code.PERMISSION_DENIED, "allow_rpcs: ReadFileToDisk is not allowed"),  # the agent policy
])
async def test_a_guest_that_cannot_copy_through_the_disk_gets_the_stdio_path(code: Code, message: str) -> None:
    runner = FakeRunner(FakeDisk(code, message))
    assert await AsyncFiles(runner).read_bytes("/f") == b"through stdio"
    assert runner.disk.calls == 1 and runner.commands == [["cat", "--", "/f"]]


async def test_a_failed_copy_is_an_error_not_a_second_try() -> None:
    runner = FakeRunner(FakeDisk(Code.NOT_FOUND, "/f: No such file or directory"))
    with pytest.raises(NotFoundError, match="No such file"):
        await AsyncFiles(runner).read_bytes("/f")
    runner = FakeRunner(FakeDisk(Code.DATA_LOSS, "bad reply: length: 9 bytes copied, asked 8"))
    with pytest.raises(SdkError, match="bad reply: length"):
        await AsyncFiles(runner).write("/f", b"x" * (2 << 20))
    assert runner.commands == []
