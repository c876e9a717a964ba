"""Prometheus metrics, in Prometheus' naming conventions (base units, `_total`, `_seconds`).

Two kinds, so the numbers are right under `spkd serve --workers N`:
- Request counters and durations are per API process. With several processes, `spkd serve` sets
  PROMETHEUS_MULTIPROC_DIR and prometheus_client's multiprocess mode adds every process's values
  up at scrape time (whichever process answers the scrape).
- Everything about jobs, the queue and the workers is read from Redis at scrape time
  (`StoreCollector`), so any process gives the same answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from spkd.core import store

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class StoreSnapshot:
    """What the store says at scrape time."""

    jobs_by_status: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0  # messages waiting in the Celery queue (not yet taken by a worker)
    live_workers: int = 0
    # name -> label -> {"<bound>"|"+Inf"|"sum": value}: store.observe_finished_job's histograms
    histograms: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


# (metric name, store name, label name or None, help, bucket bounds)
HISTOGRAMS = (
    (
        "spkd_job_duration_seconds",
        "job_duration_seconds",
        "status",
        "run time of finished jobs",
        store.DURATION_BUCKETS,
    ),
    (
        "spkd_stage_duration_seconds",
        "stage_duration_seconds",
        "stage",
        "seconds per stage of finished jobs",
        store.DURATION_BUCKETS,
    ),
    (
        "spkd_job_gpu_memory_peak_bytes",
        "job_gpu_memory_peak_bytes",
        None,
        "GPU memory peak per finished job",
        store.MEMORY_BUCKETS,
    ),
)


class Metrics:
    """The API's metrics. `registry` is what GET /metrics exposes."""

    def __init__(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode the instruments write to files in MULTIPROC_DIR; the exposed
        # registry reads all processes' files. Otherwise they live in the exposed registry.
        self.registry = CollectorRegistry()
        instruments = CollectorRegistry() if multiprocess else self.registry
        if multiprocess:
            MultiProcessCollector(self.registry)
        self.requests = Counter(
            "spkd_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=instruments
        )
        self.latency = Histogram(
            "spkd_http_request_duration_seconds",
            "HTTP request duration until the response starts",
            ["method", "route"],
            registry=instruments,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.registry.register(StoreCollector(snapshot))


class StoreCollector:
    """Gauges read from Redis at each scrape; a Redis outage drops them from that scrape only."""

    def __init__(self, snapshot: Callable[[], StoreSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Any:
        try:
            snap = self.snapshot()
        except Exception:  # noqa: BLE001 - Redis down: request metrics still answer
            return
        jobs = GaugeMetricFamily("spkd_jobs", "jobs in the store by status", labels=["status"])
        for status in store.STATUSES:
            if status in snap.jobs_by_status:
                jobs.add_metric([status], snap.jobs_by_status[status])
        yield jobs
        yield GaugeMetricFamily(
            "spkd_queue_depth", "jobs waiting in the queue for a worker", value=snap.queue_depth
        )
        yield GaugeMetricFamily(
            "spkd_workers_live", "workers whose heartbeat is fresh", value=snap.live_workers
        )
        for name, stored, label, doc, bounds in HISTOGRAMS:
            yield _histogram(name, doc, label, bounds, snap.histograms.get(stored, {}))


def _histogram(
    name: str, doc: str, label: str | None, bounds: tuple[float, ...], series: dict[str, dict[str, float]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label] if label else [])
    for value, counts in sorted(series.items()):
        buckets = [(f"{b:g}", counts.get(f"{b:g}", 0.0)) for b in bounds] + [
            ("+Inf", counts.get("+Inf", 0.0))
        ]
        family.add_metric([value] if label else [], buckets, counts.get("sum", 0.0))
    return family


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): streaming responses such as SSE pass through untouched."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)
                self.metrics.requests.labels(scope["method"], path, str(status["code"])).inc()
            await send(message)

        await self.app(scope, receive, _send)
