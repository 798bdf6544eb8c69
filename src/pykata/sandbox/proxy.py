"""The agent proxy: a sandbox's owner serves its agent's API on <sandbox>/agent.sock, so other processes
(`pykata exec`, `pykata kill`, ...) reach the agent although the virtio-serial channel takes one
connection only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pykata.agentapi import Agent
from pykata.errors import error_for
from pykata.protocols.agent import AGENT_SERVICE, HEALTH_SERVICE
from pykata.ttrpc import CallContext, RpcError, Server


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
                return await self._agent.ttrpc.call(self._service, method, request, timeout=ctx.timeout)
            except RpcError as e:
                raise error_for(e.code, e.message) from None  # the agent's status, passed on
        return forward


async def serve_agent_proxy(agent: Agent, path: Path) -> Server:
    server = Server()
    server.register(AGENT_SERVICE, _Forward(agent, AGENT_SERVICE))
    server.register(HEALTH_SERVICE, _Forward(agent, HEALTH_SERVICE))
    await server.serve_unix(str(path))
    return server
