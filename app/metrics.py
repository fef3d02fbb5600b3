"""Prometheus metrics: request counts and latencies by route, plus what the store holds.

The registry only; it imports nothing of iex, so any layer may count. Requests are counted
by ``app.http.metrics.MetricsMiddleware``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "iex_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "iex_http_request_duration_seconds",
            "Time to the end of the response, by route template and method.",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.instances = Gauge(
            "iex_instances_stored", "DICOM instances in the store.", registry=self.registry
        )
        self.bytes = Gauge(
            "iex_bytes_stored", "Bytes of DICOM instances in the store.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
