"""The Health service: liveness and version, the first RPCs a host sends after boot."""

from __future__ import annotations

import time
from typing import Any

import pykata
from pykata.protocols.agent import PROTOCOL_VERSION, agent_pb2

CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; the time module has no name for it


class HealthService:
    """Handlers for `pykata.agent.v1.Health`: plain functions, so the server answers them in the loop turn
    that read them, with no task or timer (pykata.ttrpc.server): a template's clone answers its host's
    first Check with less guest code, all of it translated afresh under TCG."""

    def __init__(self, version: str | None = None) -> None:
        self.version = version or pykata.__version__

    def Check(self, request: agent_pb2.CheckRequest, ctx: Any) -> agent_pb2.HealthCheckResponse:
        # Both clocks, so the host can tell a guest without a timer tick (pykata.agentapi.replies.tick_check):
        # the monotonic clock reads the clocksource and goes on, the coarse one moves only at a tick.
        # Read in this order, a tick between the two reads makes the coarse one newer, never older.
        clock = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        tick_clock = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
        return agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING, clock_ns=clock,
                                             tick_clock_ns=tick_clock)

    def Version(self, request: agent_pb2.CheckRequest, ctx: Any) -> agent_pb2.VersionCheckResponse:
        return agent_pb2.VersionCheckResponse(agent_version=self.version,
                                              protocol_version=PROTOCOL_VERSION)
