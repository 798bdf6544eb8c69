"""The host's client of one guest agent: ttrpc over the agent channel, with agent errors named.

One ttrpc connection carries every call of a sandbox (ttrpc multiplexes them); the channel is a
virtio-serial port behind a QEMU unix socket, or the sandbox owner's proxy socket.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from pykata.errors import AgentError
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE, agent_pb2
from pykata.ttrpc import Client, Code, RpcError, connect_unix

DEFAULT_TIMEOUT = 30.0


class AgentCallError(AgentError):
    """An agent RPC failed; carries the status code, the RPC and the sandbox."""

    def __init__(self, sandbox_id: str, rpc: str, code: Code, message: str) -> None:
        super().__init__(f"sandbox {sandbox_id}: agent {rpc}: {code.name}: {message}")
        self.sandbox_id, self.rpc, self.code, self.message = sandbox_id, rpc, code, message


class AgentClient:
    """Calls into one agent. `await client.call("CreateContainer", req)` returns the response message."""

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self.sandbox_id = sandbox_id

    @classmethod
    async def connect(cls, socket: Path, sandbox_id: str, *, timeout: float = 30.0) -> AgentClient:
        """Connect and wait until the agent answers a health check.

        The request stays queued in the channel while the guest boots, so one connection is kept and
        the check is repeated on it rather than reconnecting (which could cut a frame in half).
        Raises AgentError when the agent does not answer within `timeout`.
        """
        deadline = time.monotonic() + timeout
        client: Client | None = None
        last: BaseException | None = None
        try:
            while time.monotonic() < deadline:
                if client is None or client.closed:
                    try:
                        client = await connect_unix(str(socket), timeout=max(0.1, deadline - time.monotonic()))
                    except (OSError, TimeoutError) as e:
                        last = e
                        await asyncio.sleep(0.02)
                        continue
                try:
                    resp = await client.call(HEALTH_SERVICE, "Check", agent_pb2.CheckRequest(),
                                             timeout=min(1.0, max(0.05, deadline - time.monotonic())))
                except RpcError as e:
                    last = e
                    if e.code != Code.DEADLINE_EXCEEDED:
                        await asyncio.sleep(0.05)
                    continue
                if resp.status == agent_pb2.HealthCheckResponse.SERVING:
                    agent = cls(client, sandbox_id)
                    client = None  # ownership passes to the AgentClient
                    return agent
                await asyncio.sleep(0.02)
        finally:
            if client is not None:
                await client.close()
        raise AgentError(f"sandbox {sandbox_id}: agent did not answer within {timeout:.0f}s ({last})")

    @classmethod
    async def attach(cls, socket: Path, sandbox_id: str) -> AgentClient:
        """Connect to a running sandbox's agent proxy (no health wait). Raises AgentError."""
        try:
            return cls(await connect_unix(str(socket), timeout=5.0), sandbox_id)
        except (OSError, TimeoutError) as e:
            raise AgentError(f"sandbox {sandbox_id}: cannot reach its agent at {socket}: {e}") from None

    async def call(self, rpc: str, request: Any, *, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """Call an AgentService RPC. Raises AgentCallError (with the status code) on failure."""
        try:
            return await self._client.call(AGENT_SERVICE, rpc, request, timeout=timeout)
        except RpcError as e:
            raise AgentCallError(self.sandbox_id, rpc, e.code, e.message) from None

    async def health(self, timeout: float = 2.0) -> bool:
        try:
            resp = await self._client.call(HEALTH_SERVICE, "Check", agent_pb2.CheckRequest(), timeout=timeout)
        except RpcError:
            return False
        return bool(resp.status == agent_pb2.HealthCheckResponse.SERVING)

    @property
    def closed(self) -> bool:
        return self._client.closed

    @property
    def ttrpc(self) -> Client:
        return self._client

    async def close(self) -> None:
        await self._client.close()
