"""The Health service: liveness and version, the first RPCs a host sends after boot."""

from __future__ import annotations

from typing import Any

import pykata
from pykata.protocols.agent import PROTOCOL_VERSION, agent_pb2


class HealthService:
    """Handlers for `pykata.agent.v1.Health`."""

    def __init__(self, version: str | None = None) -> None:
        self.version = version or pykata.__version__

    async def Check(self, request: agent_pb2.CheckRequest, ctx: Any) -> agent_pb2.HealthCheckResponse:
        return agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)

    async def Version(self, request: agent_pb2.CheckRequest, ctx: Any) -> agent_pb2.VersionCheckResponse:
        return agent_pb2.VersionCheckResponse(agent_version=self.version,
                                              protocol_version=PROTOCOL_VERSION)
