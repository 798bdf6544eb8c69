"""Families rendered as the Prometheus text format (0.0.4) by prometheus_client."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pykata.monitor.scrape import Family


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


class _Families(Collector):
    def __init__(self, families: dict[str, Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from to_metrics(self.families)


def render(families: dict[str, Family]) -> bytes:
    """The text format of `families` (prometheus_client's generate_latest). Texts of families with
    different names can be concatenated into one exposition."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
