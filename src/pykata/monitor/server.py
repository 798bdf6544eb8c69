"""`pykata monitor`: the scrape served as Prometheus text by prometheus_client's HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as RegistryCollector
from prometheus_client.registry import CollectorRegistry

from pykata.errors import ConfigError
from pykata.monitor.collector import Collector
from pykata.monitor.scrape import Family

DEFAULT_LISTEN = "127.0.0.1:8090"  # kata-monitor's port


def to_metrics(families: dict[str, Family]) -> Iterator[Metric]:
    for name, fam in families.items():
        label_names = sorted({k for labels, _ in fam.samples for k, _ in labels})
        metric: GaugeMetricFamily | CounterMetricFamily
        if fam.kind == "counter":
            metric = CounterMetricFamily(name, fam.help, labels=label_names)
        else:
            metric = GaugeMetricFamily(name, fam.help, labels=label_names)
        for labels, value in fam.samples:
            d = dict(labels)
            metric.add_metric([d.get(k, "") for k in label_names], value)
        yield metric


class SandboxCollector(RegistryCollector):
    """Serves the background collection's last result (pykata.monitor.collector)."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        yield from to_metrics(self.collector.families())


def parse_listen(address: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port). Raises ConfigError naming --listen."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("--listen", f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(collector: Collector, address: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on `address` (HOST:PORT) in a thread. Raises ConfigError, OSError."""
    host, port = parse_listen(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SandboxCollector(collector))
    return start_http_server(port, host, registry=registry)
