"""Prometheus metrics, one `CollectorRegistry` per app (no module-level mutable state, so
several apps in one process, as in tests, never share or double-register collectors).

The app keeps its `Metrics` at `app.state.metrics`. The inference side reports through it:
`metrics.count_prediction(label=..., unknown=...)` after each answer, `metrics.set_index(size=,
version=)` and `metrics.set_active_model(version)` when it swaps a bundle. With `cxr serve
--workers N` each worker process has its own registry (scrape them via the pod, or run one
worker per container); multiprocess aggregation is out of scope.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The service's collectors, bound to their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cxr_http_requests_total",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cxr_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.index_size = Gauge(
            "cxr_index_size", "References in the loaded index.", registry=self.registry
        )
        self.index_version = Gauge(
            "cxr_index_version", "index_version of the loaded index.", registry=self.registry
        )
        self.active_model = Gauge(
            "cxr_active_model_info",
            "1 for the model version this process serves.",
            ["version"],
            registry=self.registry,
        )
        self.predictions = Counter(
            "cxr_predictions_total",
            "Predictions answered, by label and unknown flag.",
            ["label", "unknown"],
            registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.latency.labels(method=method, route=route).observe(seconds)

    def count_prediction(self, *, label: str, unknown: bool) -> None:
        self.predictions.labels(label=label, unknown="true" if unknown else "false").inc()

    def set_index(self, *, size: int, version: int | None = None) -> None:
        self.index_size.set(size)
        if version is not None:
            self.index_version.set(version)

    def set_active_model(self, version: str | None) -> None:
        self.active_model.clear()
        if version:
            self.active_model.labels(version=version).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
