"""A process in a sandboxed container (a container's init or an exec), driven through the agent."""

from __future__ import annotations

import asyncio
import signal as _signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal

from pykata.protocols.agent import agent_pb2

if TYPE_CHECKING:
    from pykata.sandbox.agent_client import AgentClient

READ_CHUNK = 1 << 20  # the agent's cap per read
Stream = Literal["stdout", "stderr"]


class Process:
    """stdio, signals and exit status of one process; `exec_id` is "" for a container's init."""

    def __init__(self, agent: AgentClient, container_id: str, exec_id: str, pid: int, terminal: bool) -> None:
        self._agent = agent
        self.container_id = container_id
        self.exec_id = exec_id
        self.pid = pid
        self.terminal = terminal
        self._exit: asyncio.Future[int] | None = None

    async def read(self, stream: Stream = "stdout", max_length: int = READ_CHUNK) -> bytes | None:
        """The next bytes of `stream` (waits until there are some); None at end of stream."""
        if stream == "stderr" and self.terminal:
            return None  # a terminal merges stderr into stdout
        rpc = "ReadStdout" if stream == "stdout" else "ReadStderr"
        req = agent_pb2.ReadStreamRequest(container_id=self.container_id, exec_id=self.exec_id,
                                          max_length=max_length)
        resp = await self._agent.call(rpc, req, timeout=None)
        if resp.eof and not resp.data:
            return None
        return bytes(resp.data)

    async def chunks(self, stream: Stream = "stdout") -> AsyncIterator[bytes]:
        while (data := await self.read(stream)) is not None:
            yield data

    async def write_stdin(self, data: bytes) -> None:
        """Write all of `data` to the process's stdin (the agent may take it in parts)."""
        view = memoryview(data)
        while view:
            req = agent_pb2.WriteStreamRequest(container_id=self.container_id, exec_id=self.exec_id,
                                               data=bytes(view[:READ_CHUNK]))
            resp = await self._agent.call("WriteStdin", req)
            view = view[resp.length:]

    async def close_stdin(self) -> None:
        await self._agent.call("CloseStdin", agent_pb2.CloseStdinRequest(
            container_id=self.container_id, exec_id=self.exec_id))

    async def signal(self, sig: int = _signal.SIGTERM, *, all_processes: bool = False) -> None:
        await self._agent.call("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=self.container_id, exec_id=self.exec_id, signal=int(sig), all=all_processes))

    async def resize(self, rows: int, columns: int) -> None:
        await self._agent.call("TtyWinResize", agent_pb2.TtyWinResizeRequest(
            container_id=self.container_id, exec_id=self.exec_id, rows=rows, columns=columns))

    async def wait(self) -> int:
        """The exit status (128 + signal number when killed by a signal). Safe to call many times."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._exit)

    async def _wait(self) -> int:
        resp = await self._agent.call("WaitProcess", agent_pb2.WaitProcessRequest(
            container_id=self.container_id, exec_id=self.exec_id), timeout=None)
        return int(resp.exit_status)
