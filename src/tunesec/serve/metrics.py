"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ServeMetrics:
    """Requests by status, blocked requests by reason, latency, engine batch sizes and queue depth."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tunesec_requests", "Chat completion requests by HTTP status.", ["status"], registry=self.registry
        )
        self.blocked = Counter(
            "tunesec_blocked_requests", "Requests refused by a control, by reason.", ["reason"], registry=self.registry
        )
        self.latency = Histogram(
            "tunesec_request_latency_seconds",
            "Seconds from request to last byte.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.batch = Histogram(
            "tunesec_batch_size", "Requests per engine call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )  # fmt: skip
        self.queue = Gauge("tunesec_queue_depth", "Requests waiting for the engine.", registry=self.registry)
        self.queue.set_function(queue_depth)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe(self, status: int, seconds: float, reason: str | None) -> None:
        """Count one finished request."""
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        if reason is not None:
            self.blocked.labels(reason=reason).inc()

    def on_batch(self, size: int) -> Any:
        """Record one engine call of ``size`` requests."""
        self.batch.observe(size)
