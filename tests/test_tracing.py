"""pykata.tracing: off costs no import; on, an agent RPC is a client span whose trace context travels in the
request's ttrpc metadata (a ttrpc server in this process stands in for the agent)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pykata import tracing
from pykata.agentapi import Agent
from pykata.config import load_config
from pykata.config.parse import validate
from pykata.errors import ConfigError
from pykata.protocols.agent import HEALTH_SERVICE, agent_pb2
from pykata.ttrpc import CallContext, Server, connect_unix


def test_tracing_off_imports_nothing_and_spans_are_none() -> None:
    code = """
import sys
import pykata.shim.daemon, pykata.sandbox.sandbox, pykata.agentapi.client, pykata.hypervisor.qemu.qmp
from pykata import tracing
with tracing.span("x") as s:
    assert s is None
assert tracing.carrier() is None and not tracing.enabled()
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()


def test_enable_tracing_needs_exactly_one_exporter() -> None:
    base = load_config()
    for endpoint, file in (("", ""), ("http://127.0.0.1:4318/v1/traces", "/tmp/spans.jsonl")):
        config = dataclasses.replace(base, runtime=dataclasses.replace(
            base.runtime, enable_tracing=True, tracing_endpoint=endpoint, tracing_file=file))
        with pytest.raises(ConfigError, match=r"runtime\.enable_tracing"):
            validate(config)
    bad = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, tracing_endpoint="ftp://x"))
    with pytest.raises(ConfigError, match=r"runtime\.tracing_endpoint"):
        validate(bad)


class Health:
    def __init__(self) -> None:
        self.metadata: list[dict[str, list[str]]] = []

    async def Check(self, req: Any, ctx: CallContext) -> agent_pb2.HealthCheckResponse:
        self.metadata.append(ctx.metadata)
        return agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)

    async def Version(self, req: Any, ctx: CallContext) -> agent_pb2.VersionCheckResponse:
        return agent_pb2.VersionCheckResponse()


async def test_agent_rpc_is_a_client_span_and_sends_its_context(tmp_path: Path) -> None:
    health = Health()
    server = Server()
    server.register(HEALTH_SERVICE, health)
    sock = tmp_path / "agent.sock"
    await server.serve_unix(str(sock))
    agent = Agent(await connect_unix(str(sock)), "sb1")
    spans_file = tmp_path / "spans.jsonl"
    try:
        assert await agent.check() and health.metadata == [{}]  # off: no metadata at all
        tracing.setup(service="pykata-test", file=str(spans_file))
        with tracing.span("shim.Create", sandbox_id="sb1"):
            assert await agent.check()
    finally:
        tracing.shutdown()
        await agent.close()
        await server.close()
    spans = {s["name"]: s for s in map(json.loads, spans_file.read_text().splitlines())}
    root, call = spans["shim.Create"], spans["agent.Check"]
    assert call["kind"] == "SpanKind.CLIENT" and call["attributes"]["sandbox_id"] == "sb1"
    assert call["context"]["trace_id"] == root["context"]["trace_id"]
    assert call["parent_id"] == root["context"]["span_id"]
    assert root["resource"]["attributes"]["service.name"] == "pykata-test"
    # W3C traceparent: 00-<trace id>-<span id of the client span>-01
    [traceparent] = health.metadata[1]["traceparent"]
    _, trace_id, span_id, _ = traceparent.split("-")
    assert f"0x{trace_id}" == call["context"]["trace_id"] and f"0x{span_id}" == call["context"]["span_id"]
    # the counts of the owner's agent RPCs (pykata monitor) saw both calls
    assert agent.stats.snapshot()[0][:3] == ("Check", 2, 0)


def test_otlp_http_exporter_posts_the_spans(tmp_path: Path) -> None:
    """`tracing_endpoint`: spans go to an OTLP/HTTP collector (a local HTTP server here), protobuf-encoded."""
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracing.setup(service="pykata-test", endpoint=f"http://127.0.0.1:{server.server_port}/v1/traces")
        with tracing.span("shim.Create"), tracing.span("vm.start", boot="template"):
            pass
    finally:
        tracing.shutdown()  # flushes the batch
        server.shutdown()
        thread.join(5)
    [(path, content_type, body)] = received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert sorted(s.name for s in spans) == ["shim.Create", "vm.start"]
    assert len({s.trace_id for s in spans}) == 1
