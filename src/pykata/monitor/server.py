"""`pykata monitor`: /metrics over HTTP (wsgiref's threading server, as prometheus_client's own).

A scrape is served from the collector's last collection, whose text is rendered once per collection
(pykata.monitor.collector), so what a scrape costs does not grow with the guests' answers. Always the
text format 0.0.4 (what kata-monitor serves and every Prometheus reads), gzipped when the client asks.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, ThreadingWSGIServer, gzip_accepted

from pykata.errors import ConfigError
from pykata.monitor.collector import Collector


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def metrics_app(collector: Collector) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """The WSGI app: GET /metrics (or /) -> the exposition."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET")])
            return [b""]
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /metrics\n"]
        body = collector.exposition()
        headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, 1)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


def parse_listen(address: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port). Raises ConfigError naming --listen."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("--listen", f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(collector: Collector, address: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on `address` (HOST:PORT) in a thread. Raises ConfigError, OSError."""
    host, port = parse_listen(address)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, metrics_app(collector), Server, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="pykata-monitor-http", daemon=True)
    thread.start()
    return httpd, thread
