"""Prometheus metrics: HTTP requests and latency, and what the store reports through `StoreObserver`.

`Metrics` owns its own `CollectorRegistry`, built in the lifespan (never at import),
so two apps in one process never share series. `GET /metrics` renders it in a
worker thread: a scrape never holds up the event loop.

Series:
- `chatsessions_http_requests_total{method, route, status}`: `route` is the route
  template (`/v1/sessions/{session_id}`), or `unmatched`; never the raw path.
- `chatsessions_http_request_duration_seconds{method, route}`: histogram.
- `chatsessions_store_commit_changes`: histogram of changes per committed batch.
- `chatsessions_store_commit_seconds`: histogram of commit latency.
- `chatsessions_store_queue_depth`: changes waiting for the writer.
- `chatsessions_store_cache_requests_total{result}`: `hit` or `miss`; the hit ratio
  is `hit / (hit + miss)`.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from starlette.responses import Response

from chatsessions.api.routing import JSONRoute

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RequestStats(Collector):
    """Request counts and latency histograms, kept as plain numbers and turned into series on a scrape.

    prometheus-client's Counter and Histogram take a lock for every increment (about 6 µs a
    request for both); here a request costs two dict lookups and a bisect. Only the event
    loop writes; `collect` (run by a scrape, in a worker thread) reads copies, which CPython
    makes without letting another thread run.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._buckets = buckets
        self._counts: dict[tuple[str, str, int], int] = {}
        # (method, route) → a count per bucket, one for +Inf, then the sum of the seconds.
        self._latency: dict[tuple[str, str], list[float]] = {}

    def observe(self, *, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        latency = self._latency.get((method, route))
        if latency is None:
            latency = self._latency[(method, route)] = [0.0] * (len(self._buckets) + 2)
        latency[bisect_left(self._buckets, seconds)] += 1
        latency[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "chatsessions_http_requests",
            "HTTP requests answered, by route template, method and status.",
            labels=("method", "route", "status"),
        )
        for (method, route, status), count in self._counts.copy().items():
            requests.add_metric((method, route, str(status)), count)
        yield requests
        latency = HistogramMetricFamily(
            "chatsessions_http_request_duration_seconds",
            "Time from the request to the end of the answer, by route template and method.",
            labels=("method", "route"),
        )
        bounds = [*(str(bound) for bound in self._buckets), "+Inf"]
        for (method, route), values in self._latency.copy().items():
            counts = list(values)
            cumulative = list(accumulate(counts[:-1]))
            latency.add_metric((method, route), list(zip(bounds, cumulative, strict=True)), counts[-1])
        yield latency


class Metrics:
    """The service's metrics on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestStats(LATENCY_BUCKETS)
        self.registry.register(self.requests)
        self.commit_changes = Histogram(
            "chatsessions_store_commit_changes",
            "Changes per committed transaction (group commit batch size).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "chatsessions_store_commit_seconds",
            "Time to commit one batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "chatsessions_store_queue_depth", "Changes waiting for the writer.", registry=self.registry
        )
        self.cache_requests = Counter(
            "chatsessions_store_cache_requests",
            "Reads the store looked up in its cache, by result (hit or miss).",
            ("result",),
            registry=self.registry,
        )

    def observe_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.observe(method=method, route=route, status=status, seconds=seconds)

    def observer(self) -> StoreMetrics:
        return StoreMetrics(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StoreMetrics:
    """A `StoreObserver` (storage/base.py) that feeds `Metrics`; prometheus-client is thread-safe."""

    def __init__(self, metrics: Metrics) -> None:
        self._changes = metrics.commit_changes
        self._seconds = metrics.commit_seconds
        self._depth = metrics.queue_depth
        self._hit = metrics.cache_requests.labels("hit")
        self._miss = metrics.cache_requests.labels("miss")

    def commit(self, *, changes: int, seconds: float) -> None:
        self._changes.observe(changes)
        self._seconds.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def cache(self, *, hit: bool) -> None:
        (self._hit if hit else self._miss).inc()


router = APIRouter(tags=["health"], route_class=JSONRoute)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_PLAIN_0_0_4: {}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics; no key needed."""
    registry: Metrics = request.state.metrics
    body = await asyncio.to_thread(registry.render)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)
