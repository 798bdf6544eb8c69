"""A process in a sandboxed container (a container's init or an exec), driven through the agent."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal as _signal
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Literal

from pykata.agentapi.errors import AgentReplyError
from pykata.agentapi.replies import Exited
from pykata.protocols.agent import agent_pb2

if TYPE_CHECKING:
    from pykata.agentapi import Agent

READ_CHUNK = 1 << 20  # the agent's cap per read
READ_AHEAD = 2  # reads of one stream in flight
# What all the output reads in flight to one agent may ask for together: each read asks for an equal
# share (at least MIN_READ). The agent answers a read with all it has up to what was asked, and its
# answers leave on one channel in order; with 1 MiB per read, a pod's 12 flooding streams queued
# ~12 MiB ahead of any other answer (a new exec's output, its start) and made the agent move all of it
# between two turns of its loop. One or two streams still read 1 MiB at a time.
POD_READ_BUDGET = 2 * READ_CHUNK
MIN_READ = 64 << 10
_reads_in_flight: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
WRITE_AHEAD = 3  # stdin chunks in flight
Stream = Literal["stdout", "stderr"]


def new_exec_id(seq: int) -> str:
    """An exec id unique in its container: a sequence number and a random tail."""
    return f"exec-{seq}-{secrets.token_hex(3)}"


def exec_spec(args: Sequence[str], *, env: Sequence[str] = (), cwd: str = "/", uid: int = 0, gid: int = 0,
              terminal: bool = False, groups: Sequence[int] = ()) -> agent_pb2.Process:
    """The process to exec for a command line (what `pykata exec` and the SDK ask for); `groups`: the
    user's supplementary groups."""
    return agent_pb2.Process(args=list(args), env=list(env), cwd=cwd, terminal=terminal,
                             user=agent_pb2.User(uid=uid, gid=gid, additional_gids=list(groups)))


async def start_exec(agent: Agent, container_id: str, exec_id: str, process: agent_pb2.Process,
                     stdin: bytes = b"", close_stdin: bool = False) -> Process:
    """Exec `process` and give it `stdin` (then close it with `close_stdin`): one round trip when the
    agent takes all of it with the exec (a short input; an agent of this version), else the rest is
    written and stdin closed with their own RPCs. Raises AgentError."""
    head = stdin[:READ_CHUNK]
    started = await agent.exec_process_with_stdin(container_id, exec_id, process, head,
                                                  close_stdin=close_stdin and len(head) == len(stdin))
    proc = Process(agent, container_id, exec_id, started.pid, process.terminal)
    try:
        if started.stdin_written < len(stdin):
            await proc.write_stdin(stdin[started.stdin_written:])
        if close_stdin and not started.stdin_closed:
            await proc.close_stdin()
    except BaseException:
        with contextlib.suppress(Exception):
            await proc.signal(_signal.SIGKILL)  # not left waiting for input it will never get
        raise
    return proc


class Process:
    """stdio, signals and exit status of one process; `exec_id` is "" for a container's init."""

    def __init__(self, agent: Agent, container_id: str, exec_id: str, pid: int, terminal: bool) -> None:
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
        read = self._agent.read_stdout if stream == "stdout" else self._agent.read_stderr
        active = _reads_in_flight.get(self._agent, 0) + 1
        _reads_in_flight[self._agent] = active
        try:
            share = min(max_length, max(MIN_READ, POD_READ_BUDGET // active))
            return await read(self.container_id, self.exec_id, share)
        finally:
            _reads_in_flight[self._agent] -= 1

    async def chunks(self, stream: Stream = "stdout") -> AsyncIterator[bytes]:
        """The stream's bytes as they come, with READ_AHEAD reads in flight: the agent answers
        concurrent reads of a stream in the order they arrived, so while one answer crosses the channel
        the next is being prepared (a round trip per read otherwise bounds throughput)."""
        pending: deque[asyncio.Future[bytes | None]] = deque()
        try:
            while True:
                while len(pending) < READ_AHEAD:
                    pending.append(asyncio.ensure_future(self.read(stream)))
                data = await pending.popleft()
                if data is None:
                    return
                yield data
        finally:
            for fut in pending:
                fut.cancel()
            # the reads still in flight after the end of the stream only return end of file too
            await asyncio.gather(*pending, return_exceptions=True)

    async def write_stdin(self, data: bytes) -> None:
        """Write all of `data` to the process's stdin, up to WRITE_AHEAD chunks in flight (the agent
        takes them in the order sent). A chunk taken only in part means stdin closed or the process
        went away: the rest is sent again, once, which fails with the agent's error.

        Raises AgentError; AgentReplyError (field `length`) when the agent takes part of that rest
        again (see _resend)."""
        view = memoryview(data)
        if len(view) <= READ_CHUNK:
            if view:
                taken = await self._agent.write_stdin(self.container_id, self.exec_id, bytes(view))
                if taken < len(view):
                    await self._resend(view[taken:])
            return
        pending: deque[tuple[asyncio.Future[int], int, int]] = deque()
        try:
            for start in range(0, len(view), READ_CHUNK):
                chunk = bytes(view[start:start + READ_CHUNK])
                pending.append((asyncio.ensure_future(
                    self._agent.write_stdin(self.container_id, self.exec_id, chunk)), start, len(chunk)))
                if len(pending) >= WRITE_AHEAD:
                    await self._taken(*pending.popleft(), view)
            while pending:
                await self._taken(*pending.popleft(), view)
        finally:
            for fut, _, _ in pending:
                fut.cancel()
            await asyncio.gather(*(f for f, _, _ in pending), return_exceptions=True)

    async def _taken(self, fut: asyncio.Future[int], start: int, length: int, view: memoryview) -> None:
        taken = await fut
        if taken < length:  # stdin closed midway: the resend raises the agent's error
            await self._resend(view[start + taken:start + length])

    async def _resend(self, rest: memoryview) -> None:
        """Send again the `rest` of a chunk the agent took only in part. An honest agent takes part of a
        chunk only when stdin closed or the process ended midway, so this fails with its error. One that
        takes part of the rest again is acknowledging piecemeal: resent until taken, a byte per answer
        would cost a whole chunk's copy and transfer per byte (up to 1 MiB each), so it is cut off: at
        most twice the input crosses the channel.

        Raises AgentError; AgentReplyError (field `length`) for a second partial take."""
        taken = await self._agent.write_stdin(self.container_id, self.exec_id, bytes(rest))
        if taken < len(rest):
            raise AgentReplyError(self._agent.sandbox_id, "WriteStdin", "length",
                                  f"{taken} of {len(rest)} bytes taken of a resend after a partial write: "
                                  "stdin acknowledged piecemeal, cut off")

    async def close_stdin(self) -> None:
        await self._agent.close_stdin(self.container_id, self.exec_id)

    async def signal(self, sig: int = _signal.SIGTERM, *, all_processes: bool = False) -> None:
        await self._agent.signal_process(self.container_id, self.exec_id, int(sig), all_processes=all_processes)

    async def resize(self, rows: int, columns: int) -> None:
        await self._agent.tty_win_resize(self.container_id, self.exec_id, rows, columns)

    async def wait(self) -> int:
        """The exit status (128 + signal number when killed by a signal). Safe to call many times."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._wait())
            # every waiter may have been cancelled (a caller's timeout) when the agent goes away:
            # the failure is theirs to see, not "exception never retrieved" at exit
            self._exit.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._exit)

    async def _wait(self) -> int:
        return await self._agent.wait_process(self.container_id, self.exec_id)

    @property
    def output_with_wait(self) -> bool:
        """Whether `wait_with_output` can carry output: an agent before protocol 6 sends none, so a
        caller that waited before reading would wait forever on a process blocked writing its output."""
        return self._agent.supports(6)

    @property
    def output_within(self) -> bool:
        """Whether `wait_with_output` can be bounded in time (`within_ms`): protocol 7."""
        return self._agent.supports(7)

    async def wait_with_output(self, output_limit: int = READ_CHUNK, *, within_ms: int = 0) -> Exited:
        """The exit status with what the process printed that nobody read yet, up to `output_limit`
        bytes a stream, in one round trip; read on (`read`, `chunks`) for a stream whose *_eof is False.
        A reply with `running` set came before the exit, because a stream held `output_limit` bytes:
        take them and call again; `within_ms` (see `output_within`) sets it as well after that long. Later
        `wait()` calls answer from the exit."""
        if self._exit is not None:  # a WaitProcess is already out: no output with it
            return Exited(await self.wait())
        exited = await self._agent.wait_process_output(self.container_id, self.exec_id, output_limit,
                                                       within_ms=within_ms)
        if not exited.running and self._exit is None:
            self._exit = asyncio.get_running_loop().create_future()
            self._exit.set_result(exited.status)
        return exited
