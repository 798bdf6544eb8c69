"""OpenTelemetry tracing of the pod lifecycle (`[runtime] enable_tracing`), off by default.

    tracing.setup(service="pykata-shim", endpoint="", file="/var/log/pykata/spans.jsonl")  # once
    with tracing.span("sandbox.create", sandbox_id=sid):
        ...
    metadata = tracing.carrier()          # {"traceparent": ...} for a ttrpc request, or None

Off (never set up), `span()` is one global lookup and yields None, and `opentelemetry` is never imported,
so tracing off costs nothing measurable (bench/exec_bench.py --tracing compares). On, spans nest through
contextvars (asyncio tasks inherit them), so a shim RPC, the sandbox work it does, its QMP commands and
its agent RPCs land in one trace. The agent gets the trace context in each request's ttrpc metadata
(W3C `traceparent`) but reports no spans back: the guest is untrusted, and what it would put into an
operator's trace store is not worth a checked protocol; the host's client span of each agent RPC shows
its time.

Exporters: OTLP over HTTP/protobuf (`endpoint`, e.g. http://127.0.0.1:4318/v1/traces) or JSON lines
appended to a file (`file`, one span per line; what the tests read), both written by a thread in batches
(within a second for the file), flushed by shutdown() and at exit. Several processes (one shim per pod) may
share the file: each batch is one O_APPEND write.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

_tracer: Tracer | None = None
_providers: list[TracerProvider] = []


def enabled() -> bool:
    return _tracer is not None


def setup(*, service: str, endpoint: str = "", file: str = "") -> None:
    """Start tracing in this process (idempotent: the first call wins). Exactly one of `endpoint`
    (OTLP/HTTP URL) and `file` (JSON lines) names the exporter."""
    global _tracer
    if _tracer is not None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}), shutdown_on_exit=True)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    else:  # written by a thread too, within a second; shutdown() (the shim's exit, atexit) flushes
        provider.add_span_processor(BatchSpanProcessor(_json_lines_exporter(file), schedule_delay_millis=1000))
    _providers.append(provider)
    _tracer = provider.get_tracer("pykata")


def shutdown() -> None:
    """Flush and stop (tests; the provider also flushes at interpreter exit)."""
    global _tracer
    for provider in _providers:
        provider.shutdown()
    _providers.clear()
    _tracer = None


@contextlib.contextmanager
def span(name: str, *, client: bool = False, **attributes: str | int | float | bool) -> Iterator[Span | None]:
    """A span around the block (a child of the current one); None when tracing is off. An exception
    leaving the block is recorded on the span and goes on."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span(name, kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
                                       attributes=attributes) as s:
        yield s


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers (`traceparent`) for a request's metadata; None when
    tracing is off or no span is current."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers or None


def _json_lines_exporter(path: str) -> SpanExporter:
    """A SpanExporter writing each span as one line of JSON (the SDK's own `to_json`) to `path`."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLines(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            data = "".join(s.to_json(indent=None) + "\n" for s in spans).encode()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as e:
                log.warning("tracing: cannot write %s: %s", path, e)
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    return JsonLines()
