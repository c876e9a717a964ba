"""Prometheus metrics: request counts and latency per route template, jobs by status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from app import store


class Metrics:
    def __init__(self, jobs_by_status: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "spkd_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "spkd_http_request_seconds",
            "HTTP request latency (until the response starts)",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.registry.register(_JobsCollector(jobs_by_status))


class _JobsCollector:
    def __init__(self, jobs_by_status: Callable[[], dict[str, int]]) -> None:
        self.jobs_by_status = jobs_by_status

    def collect(self) -> Any:
        g = GaugeMetricFamily("spkd_jobs", "jobs in the store by status", labels=["status"])
        try:
            counts = self.jobs_by_status()
        except Exception:  # noqa: BLE001 - Redis down: no job gauge this scrape, requests still count
            counts = {}
        for status in store.STATUSES:
            if status in counts:
                g.add_metric([status], counts[status])
        yield g


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
