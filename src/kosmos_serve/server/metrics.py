"""Prometheus metrics of one app, in their own registry (so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.routing import iter_route_contexts
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from kosmos_serve.engine import Result
from kosmos_serve.engine.batcher import BatchObserver

disable_created_metrics()  # the `_created` series only add noise to every scrape
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
# modelled on vLLM's histograms of the same names (seconds; wide, as CPU requests can take minutes)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                                 10.0, 20.0, 40.0, 80.0)
UNMATCHED = "unmatched"  # the route label of a path no route serves


def route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route a request to `scope` is counted under: the path template of the route of `routes` that serves it.

    A mounted app's routes count under the mount's prefix (`/demo/config`), a mount of files under its own template
    (`/docs/static/{path}`); a known path asked with another method under its route. Any other path is
    "unmatched", never the path itself, so that the label's values stay as few as the routes.
    """
    return _template(scope, routes) or UNMATCHED


def _template(scope: Scope, routes: Sequence[BaseRoute]) -> str | None:
    partial = None
    for route in iter_route_contexts(routes):  # FastAPI's own view of its routes, included routers flattened
        match, child_scope = route.matches(scope)
        if match is Match.NONE:
            continue
        mounted = getattr(route, "routes", None)  # a mounted app's routes ([] for files); None for a route
        if mounted:
            inner = _template({**scope, **child_scope}, mounted)
            template = None if inner is None else route.path + inner
        else:
            template = route.path if mounted is None else route.path_format  # a mount of files: `/docs/static/{path}`
        if match is Match.FULL and template is not None:
            return template
        partial = partial or template
    return partial


class Metrics:
    """Requests by route and status, latency, queue depth, batch sizes, tokens, image-cache use, and as vLLM
    exposes them: time to first token, time per output token, requests running and waiting."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kosmos_requests", "HTTP requests answered, by route and status.", ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kosmos_request_seconds", "Time from request to response, by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge("kosmos_queue_depth", "Requests waiting for the model.", registry=self.registry)
        self.batch_size = Histogram(
            "kosmos_batch_size", "Requests decoded together, observed at each decode step (continuous batching).",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry,
        )
        self.generated_tokens = Counter("kosmos_generated_tokens", "New tokens generated.", registry=self.registry)
        self.image_features = Counter(
            "kosmos_image_features", "Images a request needed, by where their features came from (cache or encoder).",
            ["source"], registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "kosmos_time_to_first_token_seconds", "From a request's arrival to its first generated token.",
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS, registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "kosmos_time_per_output_token_seconds", "A request's mean time per generated token after its first.",
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS, registry=self.registry,
        )
        self.requests_running = Gauge(
            "kosmos_requests_running", "Requests in the running batch (decoding).", registry=self.registry
        )
        self.requests_waiting = Gauge(
            "kosmos_requests_waiting", "Requests queued, not yet admitted to the running batch.", registry=self.registry
        )

    def observer(self) -> BatchObserver:
        """Hooks for the batcher."""
        return BatchObserver(queue_depth=self.queue_depth.set, step_done=self.record_step,
                             request_done=self.record_result)

    def record_step(self, decoded: int, running: int, waiting: int) -> None:
        if decoded:
            self.batch_size.observe(decoded)
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def record_result(self, result: Result, first_token: float | None, per_token: float | None) -> None:
        self.generated_tokens.inc(result.generated_tokens)
        self.image_features.labels("cache" if result.image_cached else "encoder").inc()
        if first_token is not None:
            self.time_to_first_token.observe(first_token)
        if per_token is not None:
            self.time_per_output_token.observe(per_token)

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
