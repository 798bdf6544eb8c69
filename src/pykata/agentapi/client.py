"""`Agent`: one async method per RPC of the pykata agent (protos/agent/agent.proto).

This is the only module that names agent RPCs. Each method builds its request, calls, and hands the
answer to its function in `pykata.agentapi.replies`, which checks it (the guest is untrusted) and
returns what the caller needs: a pid, an exit status, bytes. One ttrpc connection carries every call
of a sandbox (ttrpc multiplexes them); the channel is a virtio-serial port behind a QEMU unix socket,
or the sandbox owner's proxy socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket as socketlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from pykata import tracing
from pykata.agentapi import replies
from pykata.agentapi.errors import AgentCallError, AgentReplyError, AgentVersionError, GuestTickError
from pykata.errors import AgentError
from pykata.protocols.agent import (
    AGENT_SERVICE,
    HEALTH_SERVICE,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    SESSION_PROTOCOL_VERSION,
    agent_pb2,
)
from pykata.ttrpc import Client, Code, RpcError, SessionRefused, connect_fd, connect_unix
from pykata.ttrpc.session import FLUSH_SIZE, SMALL_FLUSH_SIZE
from pykata.ttrpc.stats import RpcStats

DEFAULT_TIMEOUT = 30.0
# A `timeout` argument meaning "the Agent's request_timeout".
REQUEST_TIMEOUT: float = -1.0
# Seconds without an answer on the connection connect() keeps before it makes a new one (see there);
# longer than a cold boot of a healthy guest on a busy host takes to answer.
RECONNECT_SILENCE = 15.0
# Agent RPCs without a span of their own when tracing: the stdio pumps' reads (one per chunk of output)
# and the OOM watch (one call for the sandbox's whole life).
UNTRACED_RPCS = frozenset({"ReadStdout", "ReadStderr", "GetOOMEvent"})
_M = TypeVar("_M", bound=Message)
_R = TypeVar("_R")


class _ChannelWatch:
    """What Agent.connect knows of the guest's end of its connections: whether the guest has read every
    byte written (QEMU reads from its chardev socket only what the guest's port has room for, and
    nothing while the agent has not opened it), for how long it has been silent since, and how big a
    flush the next connection writes before its hello (pykata.ttrpc.session).

    The silence that makes a new connection is counted from when the guest last read any of what we
    wrote, not from the connect: a guest still reading a flush is not silent, and a new connection would throw away
    the rest of it (QEMU drops what it did not read of a closed connection) and write another one. Under
    load a 4 MiB flush took the guest longer than RECONNECT_SILENCE to read, so each connection was
    given up before its hello came and the guest read flushes until the boot's deadline (300 s; its
    console full of `frame length 4294967295` warnings: flush bytes read as a header).
    The flush completes a half frame a host before us left in the port: our own connections' frames
    (hellos and probes) are small, so a reconnect writes a small flush; a full one (4 MiB) only when the
    caller says another host may have written (`flush`), or once a small one was not enough (a second
    silent connection)."""

    def __init__(self, flush: int) -> None:
        self.flush = flush
        self._client: Client | None = None
        self._written_flush = 0
        self._quiet_since: float | None = None
        self._unread: int | None = None  # what the guest had not read at the last look
        self.connections = 0
        self.read_by_guest = 0  # connections whose every byte the guest read
        self._counted = False
        self.full_flush_read = False

    def connected(self, client: Client) -> None:
        self._client = client
        self._written_flush = self.flush
        self._quiet_since = None
        self._unread = None
        self.connections += 1
        self._counted = False

    def look(self) -> None:
        """Note whether the guest has read all we wrote on the current connection (asked after a
        probe's wait, before anything more is written)."""
        if self._client is None:
            return
        unread = self._client.unread_by_peer()
        if self._unread is None or unread < self._unread:
            self._quiet_since = time.monotonic()  # the guest read some: not silent
        elif self._quiet_since is None:
            self._quiet_since = time.monotonic()
        self._unread = unread
        if unread:
            return
        if not self._counted:
            self._counted = True
            self.read_by_guest += 1
        if self._written_flush >= FLUSH_SIZE:
            self.full_flush_read = True

    def silent_for(self) -> float:
        """Seconds since the guest last read any of this connection's bytes without answering, as of the
        last look (taken when a probe's wait ended, before the next writes). A guest that reads nothing
        (an agent that has not opened its port: a tickless guest's agent waits for a host-connect event)
        is as silent as one that read everything and did not answer; one still reading is not."""
        return 0.0 if self._quiet_since is None else time.monotonic() - self._quiet_since

    def reconnecting(self) -> None:
        self._client = None
        small = self.full_flush_read or (self.connections == 1 and self._written_flush == 0)
        self.flush = SMALL_FLUSH_SIZE if small else FLUSH_SIZE

    def describe(self) -> str:
        if not self.connections:
            return "its channel's socket never took a connection"
        if not self.read_by_guest:
            return (f"the guest never read its agent port ({self.connections} connection(s); a guest whose "
                    "agent has not opened the port reads nothing)")
        return (f"the guest read all of {self.read_by_guest} of {self.connections} connection(s) and never "
                "answered the session hello")


class Agent:
    """The agent of one sandbox. Raises AgentCallError (with the status code) when an RPC fails and
    AgentReplyError (code DATA_LOSS) when its answer is out of contract."""

    def __init__(self, client: Client, sandbox_id: str, *, request_timeout: float = DEFAULT_TIMEOUT) -> None:
        """`request_timeout`: seconds an RPC that has an end may take (every RPC but those that wait
        for a process, its output or an OOM kill); a guest that never answers costs at most that."""
        self._client = client
        self.sandbox_id = sandbox_id
        self.request_timeout = request_timeout
        self.stats = RpcStats()  # per RPC: calls, errors, seconds (`pykata monitor`)
        # What the guest's agent speaks, capped at ours (the protocol only grows, so a newer agent
        # serves what we know); set by connect() and attach() from its Version answer.
        self.protocol_version = PROTOCOL_VERSION
        self.agent_version = ""

    # -- connection --------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, socket: Path, sandbox_id: str, *, timeout: float = 30.0,
                      request_timeout: float = DEFAULT_TIMEOUT,
                      connection: socketlib.socket | None = None, flush: bool = False) -> Agent:
        """Connect and wait until the agent answers a health check.

        The request stays queued in the channel while the guest boots, so one connection is kept and
        the check is repeated on it rather than reconnecting (which could cut a frame in half), until
        it has been silent for RECONNECT_SILENCE since the guest last read any of this connection
        (_ChannelWatch): then a new connection (a guest without a timer tick
        never takes up a session that began before its agent opened its port: the agent's fallback
        for that is a timer; a new connection is a host-connect event, which wakes it).
        Each connection opens a host session with a hello (pykata.ttrpc.session): answers to the probes
        of a connection given up on may still be on their way, and the agent may never have seen that
        connection end; the hello makes the agent drop them and this side read only after its echo.
        A probe that times out before the echo came sends a new hello on the same connection, a
        fallback: today's agent loses no hello (it never closes its port, and believes an end of file
        only once the port has had no host for a moment: FdReader's peer_present, which its serve loop
        passes on since 8516746), but one from before that took the stale end of file that can follow
        a new host's first bytes for the end of that host's session and dropped its hello with it
        (a snapshot saved with an older guest still runs such an agent). A connection made
        after a silent one writes a flush before its hello: the silent one's hello may
        have gone into half a frame an earlier host left in the port (pykata.ttrpc.session); a small
        one first, as big as our own frames (_ChannelWatch).
        Each check goes with a Version request (no round trip of its own); the protocol version of the
        agent that answers is checked and kept, as `negotiate` does.
        The answer's clocks are checked for a dead timer tick in the guest (`_check_tick`).
        `connection`: a socket already connected to `socket` (Hypervisor.take_agent_connection), used
        first and closed here (the session runs on a duplicate of it). `flush`: the first connection
        writes a flush too (a restored snapshot's agent may hold half a frame of the host that saved it).
        Raises AgentError when the agent does not answer within `timeout` (saying whether the guest read
        what we wrote: an agent that never opened its port, or one that read and never answered),
        AgentVersionError when it
        is too old for this host, AgentReplyError when its version answer is out of contract,
        GuestTickError when its guest has no timer tick.
        """
        deadline = time.monotonic() + timeout
        client: Client | None = None
        last: BaseException | None = None
        channel = _ChannelWatch(FLUSH_SIZE if flush else 0)
        try:
            while time.monotonic() < deadline:
                if client is not None and (client.closed or channel.silent_for() > RECONNECT_SILENCE):
                    await client.close()
                    client = None
                    channel.reconnecting()
                if client is None:
                    try:
                        if connection is not None:
                            early, connection = connection, None
                            with early:
                                client = await connect_fd(early.fileno(), session=True, flush=channel.flush)
                        else:
                            client = await connect_unix(str(socket), timeout=max(0.1, deadline - time.monotonic()),
                                                        session=True, flush=channel.flush)
                        channel.connected(client)
                    except (OSError, TimeoutError) as e:
                        last = e
                        await asyncio.sleep(0.02)
                        continue
                agent = cls(client, sandbox_id, request_timeout=request_timeout)
                try:
                    answer, version = await agent._probe(min(1.0, max(0.05, deadline - time.monotonic())))
                except AgentReplyError:
                    raise  # an answer out of contract: not a guest still booting
                except AgentCallError as e:
                    channel.look()  # before anything more is written on this connection
                    last = e
                    why = client.close_reason
                    if isinstance(why, SessionRefused):
                        if why.old_agent:
                            raise AgentVersionError(sandbox_id, SESSION_PROTOCOL_VERSION - 1, "older",
                                                    SESSION_PROTOCOL_VERSION, PROTOCOL_VERSION) from None
                        last = why
                    if e.code != Code.DEADLINE_EXCEEDED:
                        await asyncio.sleep(0.05)
                    else:
                        # no echo within a probe's time: the hello may have been lost (a guest that
                        # closed its port just as it came); another one costs ~80 bytes
                        client.hello_again()
                    continue
                channel.look()
                if replies.health(answer):
                    agent._take_version(version)
                    await agent._check_tick(answer)
                    client = None  # ownership passes to the Agent
                    return agent
                await asyncio.sleep(0.02)
        finally:
            if connection is not None:
                connection.close()
            if client is not None:
                channel.look()
                await client.close()
        raise AgentError(f"sandbox {sandbox_id}: agent did not answer within {timeout:.0f}s: {channel.describe()} "
                         f"({last})")

    @classmethod
    async def attach(cls, socket: Path, sandbox_id: str) -> Agent:
        """Connect to a running sandbox's agent proxy (no health wait) and check its agent's protocol
        version. Raises AgentError (AgentVersionError, AgentReplyError as connect)."""
        try:
            agent = cls(await connect_unix(str(socket), timeout=5.0), sandbox_id)
        except (OSError, TimeoutError) as e:
            raise AgentError(f"sandbox {sandbox_id}: cannot reach its agent at {socket}: {e}") from None
        try:
            await agent.negotiate(timeout=5.0)
        except BaseException:
            await agent.close()
            raise
        return agent

    @property
    def closed(self) -> bool:
        return self._client.closed

    @property
    def ttrpc(self) -> Client:
        """The connection, for the agent proxy (which forwards calls it does not read)."""
        return self._client

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, rpc: str, request: Message, reply: type[_M], *,
                    timeout: float | None = REQUEST_TIMEOUT, service: Any = AGENT_SERVICE) -> _M:
        if timeout == REQUEST_TIMEOUT:
            timeout = self.request_timeout
        if tracing.enabled() and rpc not in UNTRACED_RPCS:
            with tracing.span(f"agent.{rpc}", client=True, sandbox_id=self.sandbox_id):
                return await self._timed(rpc, request, reply, timeout, service, tracing.carrier())
        return await self._timed(rpc, request, reply, timeout, service, None)

    async def _timed(self, rpc: str, request: Message, reply: type[_M], timeout: float | None, service: Any,
                     metadata: dict[str, str] | None) -> _M:
        start = time.perf_counter()
        try:
            resp = await self._client.call(service, rpc, request, timeout=timeout, metadata=metadata)
        except RpcError as e:
            self.stats.record(rpc, time.perf_counter() - start, False)
            raise AgentCallError(self.sandbox_id, rpc, e.code, e.message) from None
        except BaseException:
            self.stats.record(rpc, time.perf_counter() - start, False)
            raise
        self.stats.record(rpc, time.perf_counter() - start, True)
        if not isinstance(resp, reply):  # the service spec decodes to its declared type
            raise AgentReplyError(self.sandbox_id, rpc, "(message)", f"{type(resp).__name__}, not {reply.__name__}")
        return resp

    def _checked(self, rpc: str, check: Callable[..., _R], *args: Any) -> _R:
        """`check(*args)` (a function of pykata.agentapi.replies), its BadReply named with our RPC."""
        try:
            return check(*args)
        except replies.BadReply as e:
            raise AgentReplyError(self.sandbox_id, rpc, e.field, str(e)) from None

    # -- health ------------------------------------------------------------------------------------

    async def check(self, *, timeout: float | None = 2.0) -> bool:
        """True when the agent answers that it serves. Raises AgentCallError."""
        return replies.health(await self._check(timeout))

    async def _check(self, timeout: float | None) -> agent_pb2.HealthCheckResponse:
        return await self._call("Check", agent_pb2.CheckRequest(), agent_pb2.HealthCheckResponse,
                                timeout=timeout, service=HEALTH_SERVICE)

    async def _check_tick(self, answer: agent_pb2.HealthCheckResponse, rechecks: int = 3) -> None:
        """Raise GuestTickError when the guest that gave Check `answer` has no timer tick: its coarse clock
        stands still while its monotonic clock goes on (replies.GuestClocks). Costs nothing when the
        answer's coarse clock is within TICK_LAG_NS (healthy guests: one tick); else the guest is asked
        again after a while (a guest starved by the host catches up at its next tick), at most
        `rechecks` times. Raises GuestTickError, AgentReplyError, AgentCallError."""
        first = self._checked("Check", replies.guest_clocks, answer)
        if first is None or first.lag_ns < replies.TICK_LAG_NS:
            return
        for _ in range(rechecks):
            await asyncio.sleep(1.5 * replies.TICK_STALL_NS / 1e9)  # the guest's clocks follow the host's
            now = self._checked("Check", replies.guest_clocks, await self._check(REQUEST_TIMEOUT))
            if now is None or now.tick_clock_ns != first.tick_clock_ns:
                return
            if replies.tick_stalled(first, now):
                raise GuestTickError(self.sandbox_id, now.tick_clock_ns, now.clock_ns - first.clock_ns)

    async def clocks(self, *, timeout: float | None = REQUEST_TIMEOUT) -> replies.GuestClocks | None:
        """The guest's monotonic and coarse clocks, by a Check (None from an agent that sends none); two
        of them a while apart tell a dead timer tick (replies.tick_stalled). Raises AgentCallError,
        AgentReplyError."""
        return self._checked("Check", replies.guest_clocks, await self._check(timeout))

    async def health(self, timeout: float = 2.0) -> bool:
        """Like check(), but False instead of an error."""
        try:
            return await self.check(timeout=timeout)
        except AgentCallError:
            return False

    async def version(self, *, timeout: float | None = REQUEST_TIMEOUT) -> replies.AgentVersion:
        resp = await self._call("Version", agent_pb2.CheckRequest(), agent_pb2.VersionCheckResponse,
                                timeout=timeout, service=HEALTH_SERVICE)
        return self._checked("Version", replies.version, resp)

    async def negotiate(self, *, timeout: float | None = REQUEST_TIMEOUT) -> None:
        """Ask the agent's protocol version (the first thing a host does with an agent) and keep it, at
        most ours, in `protocol_version`. Raises AgentVersionError below MIN_PROTOCOL_VERSION,
        AgentReplyError for an answer out of contract, AgentCallError."""
        self._take_version(await self.version(timeout=timeout))

    def _take_version(self, v: replies.AgentVersion) -> None:
        if v.protocol_version < MIN_PROTOCOL_VERSION:
            raise AgentVersionError(self.sandbox_id, v.protocol_version, v.agent_version, MIN_PROTOCOL_VERSION,
                                    PROTOCOL_VERSION)
        self.protocol_version = min(v.protocol_version, PROTOCOL_VERSION)
        self.agent_version = v.agent_version

    async def _probe(self, timeout: float) -> tuple[agent_pb2.HealthCheckResponse, replies.AgentVersion]:
        """Check and Version sent together (connect's readiness probe): the version costs no round trip
        of its own on a sandbox's start. Raises AgentCallError."""
        check = asyncio.ensure_future(self._check(timeout))
        try:
            version = await self.version(timeout=timeout)
        except BaseException:
            check.cancel()
            with contextlib.suppress(BaseException):
                await check
            raise
        return await check, version

    def supports(self, protocol_version: int) -> bool:
        """Whether the agent serves what `protocol_version` of the protocol brought."""
        return self.protocol_version >= protocol_version

    def _require(self, rpc: str, protocol_version: int) -> None:
        """An RPC newer than the agent fails here with UNIMPLEMENTED, as the agent would answer (callers
        with a fallback take it), naming both versions, without a round trip to the guest."""
        if not self.supports(protocol_version):
            raise AgentCallError(self.sandbox_id, rpc, Code.UNIMPLEMENTED,
                                 f"the guest's agent speaks protocol {self.protocol_version} "
                                 f"(pykata {self.agent_version!r}), {rpc} needs {protocol_version}: "
                                 "rebuild the guest image (`pykata image build`)")

    # -- sandbox -----------------------------------------------------------------------------------

    async def create_sandbox(self, sandbox_id: str, *, hostname: str = "",
                             storages: Sequence[agent_pb2.Storage] = (), dns: Sequence[str] = (),
                             sandbox_pidns: bool = False,
                             kernel_modules: Sequence[agent_pb2.KernelModule] = (),
                             debug_console: bool = False) -> None:
        """`debug_console`: allow StartDebugConsole in this guest (the host's configuration decides)."""
        await self._call("CreateSandbox", agent_pb2.CreateSandboxRequest(
            sandbox_id=sandbox_id, hostname=hostname, storages=list(storages), dns=list(dns),
            sandbox_pidns=sandbox_pidns, kernel_modules=list(kernel_modules), debug_console=debug_console),
            Message)

    async def destroy_sandbox(self, timeout_seconds: int = 0, *, timeout: float | None = REQUEST_TIMEOUT) -> None:
        await self._call("DestroySandbox", agent_pb2.DestroySandboxRequest(timeout_seconds=timeout_seconds),
                         Message, timeout=timeout)

    # -- containers and processes ------------------------------------------------------------------

    async def create_container(self, container_id: str, oci_spec_json: str, *, terminal: bool = False,
                               storages: Sequence[agent_pb2.Storage] = (),
                               devices: Sequence[agent_pb2.Device] = (), sandbox_pidns: bool = False,
                               pid_ns_container: str = "", timeout: float | None = REQUEST_TIMEOUT) -> int:
        """Create (not start) the container; returns its init's pid. With `pid_ns_container` it joins the
        pid namespace of that container of the sandbox."""
        resp = await self._call("CreateContainer", agent_pb2.CreateContainerRequest(
            container_id=container_id, oci_spec_json=oci_spec_json, terminal=terminal, storages=list(storages),
            devices=list(devices), sandbox_pidns=sandbox_pidns, pid_ns_container=pid_ns_container),
            agent_pb2.CreateContainerResponse, timeout=timeout)
        return self._checked("CreateContainer", replies.create_container, resp)

    async def start_container(self, container_id: str) -> int:
        """Start the container's init; returns its pid."""
        resp = await self._call("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id),
                                agent_pb2.StartContainerResponse)
        return self._checked("StartContainer", replies.start_container, resp)

    async def remove_container(self, container_id: str, timeout_seconds: int = 0, *,
                               timeout: float | None = REQUEST_TIMEOUT) -> None:
        await self._call("RemoveContainer", agent_pb2.RemoveContainerRequest(
            container_id=container_id, timeout_seconds=timeout_seconds), Message, timeout=timeout)

    async def exec_process(self, container_id: str, exec_id: str, process: agent_pb2.Process) -> int:
        """Start another process in a running container; returns its pid."""
        return (await self.exec_process_with_stdin(container_id, exec_id, process)).pid

    async def exec_process_with_stdin(self, container_id: str, exec_id: str, process: agent_pb2.Process,
                                      stdin: bytes = b"", *, close_stdin: bool = False) -> replies.Started:
        """Start another process and hand it `stdin` (at most 1 MiB), then close its stdin
        (`close_stdin`), in one round trip; the reply says what the agent did (an older agent does
        neither: the caller writes and closes as before)."""
        if not self.supports(6):  # it would drop them unread: not sent at all
            stdin, close_stdin = b"", False
        resp = await self._call("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=process, stdin=stdin, close_stdin=close_stdin),
            agent_pb2.ExecProcessResponse)
        return self._checked("ExecProcess", replies.exec_process, resp, len(stdin), close_stdin)

    async def write_file_from_disk(self, container_id: str, process: agent_pb2.Process, path: str, disk: str, *,
                                   offset: int, length: int, create: bool, mode: int | None = None,
                                   owner: tuple[int, int] | None = None, timeout: float | None) -> replies.DiskFile:
        """The data disk's first `length` bytes into a container's file at `offset`, copied by the
        container's process `process` (protocol version 5; UNIMPLEMENTED for an older agent)."""
        self._require("WriteFileFromDisk", 5)
        req = agent_pb2.DiskFileRequest(container_id=container_id, process=process, path=path, disk=disk,
                                        offset=offset, length=length, create=create)
        if mode is not None:
            req.mode = mode
        if owner is not None:
            req.uid, req.gid = owner
        resp = await self._call("WriteFileFromDisk", req, agent_pb2.DiskFileResponse, timeout=timeout)
        return self._checked("WriteFileFromDisk", replies.disk_file, resp, length, True)

    async def read_file_to_disk(self, container_id: str, process: agent_pb2.Process, path: str, disk: str, *,
                                offset: int, length: int, timeout: float | None) -> replies.DiskFile:
        """At most `length` bytes of a container's file from `offset` onto the data disk's start
        (protocol version 5)."""
        self._require("ReadFileToDisk", 5)
        resp = await self._call("ReadFileToDisk", agent_pb2.DiskFileRequest(
            container_id=container_id, process=process, path=path, disk=disk, offset=offset, length=length),
            agent_pb2.DiskFileResponse, timeout=timeout)
        return self._checked("ReadFileToDisk", replies.disk_file, resp, length, False)

    async def signal_process(self, container_id: str, exec_id: str, signal: int, *,
                             all_processes: bool = False) -> None:
        await self._call("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes), Message)

    async def wait_process(self, container_id: str, exec_id: str = "") -> int:
        """Wait (without a timeout) until the process ends; its exit status, 0..255."""
        resp = await self._call("WaitProcess", agent_pb2.WaitProcessRequest(
            container_id=container_id, exec_id=exec_id), agent_pb2.WaitProcessResponse, timeout=None)
        return self._checked("WaitProcess", replies.wait_process, resp)

    async def wait_process_output(self, container_id: str, exec_id: str, output_limit: int, *,
                                  within_ms: int = 0) -> replies.Exited:
        """Wait until the process ends; its exit status with up to `output_limit` bytes of each output
        stream not read yet (a short command's whole output, in the same round trip). `within_ms` > 0
        (protocol 7, UNIMPLEMENTED before): answer `running` after that long at the latest."""
        if within_ms:
            self._require("WaitProcess output_wait_ms", 7)
        resp = await self._call("WaitProcess", agent_pb2.WaitProcessRequest(
            container_id=container_id, exec_id=exec_id, output_limit=output_limit, output_wait_ms=within_ms),
            agent_pb2.WaitProcessResponse, timeout=None)
        return self._checked("WaitProcess", replies.wait_process_output, resp, output_limit, within_ms > 0)

    async def update_container(self, container_id: str, linux_resources: Mapping[str, Any]) -> None:
        """Apply an OCI `linux.resources` object."""
        await self._call("UpdateContainer", agent_pb2.UpdateContainerRequest(
            container_id=container_id, linux_resources_json=json.dumps(linux_resources)), Message)

    async def stats_container(self, container_id: str, *,
                              timeout: float | None = REQUEST_TIMEOUT) -> agent_pb2.StatsContainerResponse:
        resp = await self._call("StatsContainer", agent_pb2.StatsContainerRequest(container_id=container_id),
                                agent_pb2.StatsContainerResponse, timeout=timeout)
        return self._checked("StatsContainer", replies.stats_container, resp)

    async def pause_container(self, container_id: str) -> None:
        await self._call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=container_id), Message)

    async def resume_container(self, container_id: str) -> None:
        await self._call("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=container_id), Message)

    # -- stdio -------------------------------------------------------------------------------------

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """Write some of `data` (at least one byte unless empty); returns how many were taken."""
        resp = await self._call("WriteStdin", agent_pb2.WriteStreamRequest(
            container_id=container_id, exec_id=exec_id, data=data), agent_pb2.WriteStreamResponse)
        return self._checked("WriteStdin", replies.write_stdin, resp, len(data))

    async def read_stdout(self, container_id: str, exec_id: str, max_length: int) -> bytes | None:
        """The next bytes of stdout (waits, without a timeout, until there are some); None at its end."""
        return await self._read("ReadStdout", container_id, exec_id, max_length)

    async def read_stderr(self, container_id: str, exec_id: str, max_length: int) -> bytes | None:
        """The next bytes of stderr (waits, without a timeout, until there are some); None at its end."""
        return await self._read("ReadStderr", container_id, exec_id, max_length)

    async def _read(self, rpc: str, container_id: str, exec_id: str, max_length: int) -> bytes | None:
        resp = await self._call(rpc, agent_pb2.ReadStreamRequest(
            container_id=container_id, exec_id=exec_id, max_length=max_length), agent_pb2.ReadStreamResponse,
            timeout=None)
        return self._checked(rpc, replies.read_stream, resp, max_length)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self._call("CloseStdin", agent_pb2.CloseStdinRequest(container_id=container_id, exec_id=exec_id),
                         Message)

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        await self._call("TtyWinResize", agent_pb2.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, columns=columns), Message)

    # -- events and guest --------------------------------------------------------------------------

    async def get_oom_event(self) -> str:
        """Wait (without a timeout) for the next OOM kill; the id of its container ("" for none)."""
        resp = await self._call("GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent, timeout=None)
        return self._checked("GetOOMEvent", replies.get_oom_event, resp)

    async def get_guest_details(self, *, mem_block_size: bool = False) -> agent_pb2.GuestDetailsResponse:
        resp = await self._call("GetGuestDetails", agent_pb2.GuestDetailsRequest(mem_block_size=mem_block_size),
                                agent_pb2.GuestDetailsResponse)
        return self._checked("GetGuestDetails", replies.get_guest_details, resp)

    async def get_guest_metrics(self, *, timeout: float | None = REQUEST_TIMEOUT) -> agent_pb2.GuestMetrics:
        """The guest's memory, load, CPU time, network and disk counters and the agent's own process
        (protocol version 3; UNIMPLEMENTED for an older agent)."""
        self._require("GetGuestMetrics", 3)
        resp = await self._call("GetGuestMetrics", agent_pb2.GuestMetricsRequest(), agent_pb2.GuestMetrics,
                                timeout=timeout)
        return self._checked("GetGuestMetrics", replies.guest_metrics, resp)

    async def start_debug_console(self, exec_id: str, args: Sequence[str] = (), *, terminal: bool = False,
                                  term: str = "", rows: int = 0, columns: int = 0) -> int:
        """Start a process in the guest itself (the debug console); its pid. The agent refuses with
        PERMISSION_DENIED unless CreateSandbox enabled the console. Its stdio goes through the stdio
        RPCs with container_id "" (protocol version 3)."""
        self._require("StartDebugConsole", 3)
        resp = await self._call("StartDebugConsole", agent_pb2.DebugConsoleRequest(
            exec_id=exec_id, args=list(args), terminal=terminal, term=term, rows=rows, columns=columns),
            agent_pb2.ExecProcessResponse)
        return self._checked("StartDebugConsole", replies.exec_process, resp).pid

    async def online_cpu_mem(self, *, wait: bool = True, nb_cpus: int = 0, cpu_only: bool = False) -> None:
        await self._call("OnlineCPUMem", agent_pb2.OnlineCPUMemRequest(wait=wait, nb_cpus=nb_cpus,
                                                                        cpu_only=cpu_only), Message)

    async def set_guest_date_time(self, sec: int, usec: int, *, timeout: float | None = REQUEST_TIMEOUT) -> None:
        await self._call("SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest(sec=sec, usec=usec), Message,
                         timeout=timeout)

    async def copy_file(self, path: str, data: bytes, *, offset: int = 0, file_size: int | None = None,
                        file_mode: int = 0o644, dir_mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        """Write (part of) a guest file; `file_size` defaults to offset + len(data) (the last part)."""
        await self._call("CopyFile", agent_pb2.CopyFileRequest(
            path=path, data=data, offset=offset,
            file_size=offset + len(data) if file_size is None else file_size,
            file_mode=file_mode, dir_mode=dir_mode, uid=uid, gid=gid), Message)

    async def sync_volume(self, name: str, size: int, entries: Sequence[agent_pb2.VolumeEntry], *,
                          timeout: float | None = REQUEST_TIMEOUT) -> None:
        """Make the guest's copy of pod volume `name` (a tmpfs of `size` bytes, made by the first call)
        the tree `entries` (protocol version 9; UNIMPLEMENTED for an older agent)."""
        self._require("SyncVolume", 9)
        await self._call("SyncVolume", agent_pb2.SyncVolumeRequest(name=name, size=size, entries=entries),
                         Message, timeout=timeout)

    # -- templates and policy (protocol version 2) ---------------------------------------------------

    async def reseed_random_dev(self, data: bytes, boot_id: str = "") -> replies.Reseeded:
        """Mix host randomness into a cloned guest's RNGs and give it a boot id of its own."""
        resp = await self._call("ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=data, boot_id=boot_id),
                                agent_pb2.ReseedRandomDevResponse)
        return self._checked("ReseedRandomDev", replies.reseed_random_dev, resp)

    async def warm_up(self, *, timeout: float | None = REQUEST_TIMEOUT) -> None:
        """Run a throwaway container in a VM no pod has yet (protocol version 4), so its first real
        container starts on warm code; refused (FailedPrecondition) once the VM serves a pod."""
        self._require("WarmUp", 4)
        await self._call("WarmUp", agent_pb2.WarmUpRequest(), Message, timeout=timeout)

    async def set_policy(self, policy_json: str) -> None:
        """Set the agent policy (docs/policy.md); RPCs it does not allow are refused from then on."""
        await self._call("SetPolicy", agent_pb2.SetPolicyRequest(policy_json=policy_json), Message)

    # -- networking --------------------------------------------------------------------------------

    async def update_interface(self, interface: agent_pb2.Interface) -> agent_pb2.Interface:
        resp = await self._call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=interface),
                                agent_pb2.Interface)
        return self._checked("UpdateInterface", replies.interface, resp)

    async def update_routes(self, routes: Sequence[agent_pb2.Route]) -> list[agent_pb2.Route]:
        """Make `routes` the guest's whole route table; returns the table as the guest has it."""
        resp = await self._call("UpdateRoutes", agent_pb2.UpdateRoutesRequest(
            routes=agent_pb2.Routes(routes=list(routes))), agent_pb2.Routes)
        return self._checked("UpdateRoutes", replies.routes, resp)

    async def list_interfaces(self) -> list[agent_pb2.Interface]:
        resp = await self._call("ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces)
        return self._checked("ListInterfaces", replies.interfaces, resp)

    async def list_routes(self) -> list[agent_pb2.Route]:
        resp = await self._call("ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes)
        return self._checked("ListRoutes", replies.routes, resp)
