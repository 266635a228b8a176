"""Prometheus metrics of one app, in their own registry (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from kosmos_serve.engine import Result
from kosmos_serve.server.batcher import BatchObserver

disable_created_metrics()  # the `_created` series only add noise to every scrape
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests by route and status, latency, queue depth, batch sizes, tokens and image-cache use."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kosmos_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kosmos_request_seconds", "Time from request to response, by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge("kosmos_queue_depth", "Requests waiting for the model.", registry=self.registry)
        self.batch_size = Histogram(
            "kosmos_batch_size", "Requests run together in one batch.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )
        self.generated_tokens = Counter("kosmos_generated_tokens", "New tokens generated.", registry=self.registry)
        self.image_features = Counter(
            "kosmos_image_features", "Images a request needed, by where their features came from (cache or encoder).",
            ["source"], registry=self.registry,
        )

    def observer(self) -> BatchObserver:
        """Hooks for the batcher."""
        return BatchObserver(queue_depth=self.queue_depth.set, batch_done=self.record_batch)

    def record_batch(self, size: int, results: list[Result]) -> None:
        self.batch_size.observe(size)
        for result in results:
            self.generated_tokens.inc(result.generated_tokens)
            self.image_features.labels("cache" if result.image_cached else "encoder").inc()

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
