"""The agent proxy: a sandbox's owner serves its agent's API on <sandbox>/agent.sock, so other processes
(`pykata exec`, `pykata kill`, ...) reach the agent although the virtio-serial channel takes one
connection only. Next to it, the owner's own figures for `pykata monitor` (protos/owner/owner.proto)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pykata.agentapi import Agent
from pykata.agentapi.errors import guest_text
from pykata.errors import error_for
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE
from pykata.protocols.owner import OWNER_SERVICE, owner_pb2
from pykata.ttrpc import CallContext, RpcError, Server
from pykata.ttrpc.stats import PROCESS, RpcStats


class _Forward:
    """Forwards each call of one service to the agent, keeping the caller's deadline."""

    def __init__(self, agent: Agent, service: Any) -> None:
        self._agent = agent
        self._service = service

    def __getattr__(self, method: str) -> Any:
        if method not in self._service.methods:
            raise AttributeError(method)

        async def forward(request: Any, ctx: CallContext) -> Any:
            try:
                # the caller's metadata (its trace context) goes on with the call
                return await self._agent.ttrpc.call(self._service, method, request, timeout=ctx.timeout,
                                                    metadata=ctx.metadata)
            except RpcError as e:
                raise error_for(e.code, guest_text(e.message)) from None  # the agent's status, passed on
        return forward


def _rpc_stats(stats: RpcStats | None) -> list[owner_pb2.RpcStats]:
    if stats is None:
        return []
    return [owner_pb2.RpcStats(method=m, calls=n, errors=e, seconds=s) for m, n, e, s in stats.snapshot()]


class _Owner:
    """pykata.owner.v1.Owner: this process's RPC counts (served, and to this sandbox's agent) and events."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Metrics(self, request: owner_pb2.OwnerMetricsRequest, ctx: CallContext) -> owner_pb2.OwnerMetrics:
        counters = {name: fn() for name, fn in PROCESS.counters.items()}
        return owner_pb2.OwnerMetrics(served=_rpc_stats(PROCESS.served), agent_calls=_rpc_stats(self._agent.stats),
                                      events_sent=counters.get("events_sent", 0),
                                      events_dropped=counters.get("events_dropped", 0))


async def serve_agent_proxy(agent: Agent, path: Path) -> Server:
    server = Server()
    server.register(AGENT_SERVICE, _Forward(agent, AGENT_SERVICE))
    server.register(HEALTH_SERVICE, _Forward(agent, HEALTH_SERVICE))
    server.register(OWNER_SERVICE, _Owner(agent))
    await server.serve_unix(str(path))
    return server
