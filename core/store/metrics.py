"""The ops histograms (Prometheus): recorded by workers when a job ends, in P:metrics:<name>
(label|bucket -> count), read by the API's /metrics from any process."""

from __future__ import annotations

from typing import Any

import redis

from spkd.core.store.jobs import get_job
from spkd.core.store.keys import FINAL, Keys

DURATION_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
MEMORY_BUCKETS = tuple(float(2**g) * 2**30 for g in range(0, 9))  # 1 GiB .. 256 GiB


def _observe(pipe: Any, keys: Keys, name: str, label: str, value: float, buckets: tuple[float, ...]) -> None:
    key = f"{keys.prefix}:metrics:{name}"
    for b in buckets:
        if value <= b:
            pipe.hincrby(key, f"{label}|{b:g}", 1)
    pipe.hincrby(key, f"{label}|+Inf", 1)
    pipe.hincrbyfloat(key, f"{label}|sum", value)


def observe_finished_job(r: redis.Redis, keys: Keys, job_id: str) -> None:
    """Record a finished job in the ops histograms: its run time by final status, each stage's
    seconds (from metrics.json's `timing`) and its GPU memory peak. Best effort: a job record that
    lacks a field skips that histogram."""
    job = get_job(r, keys, job_id)
    if job is None or job["status"] not in FINAL or not job.get("started_at") or not job.get("finished_at"):
        return
    pipe = r.pipeline(transaction=False)
    duration = max(0.0, job["finished_at"] - job["started_at"])
    _observe(pipe, keys, "job_duration_seconds", job["status"], duration, DURATION_BUCKETS)
    metrics = job.get("metrics") or {}
    for stage, seconds in (metrics.get("timing") or {}).items():
        if isinstance(seconds, int | float):
            _observe(pipe, keys, "stage_duration_seconds", stage, float(seconds), DURATION_BUCKETS)
    peak = metrics.get("gpu_memory_peak_bytes")
    if isinstance(peak, int | float):
        _observe(pipe, keys, "job_gpu_memory_peak_bytes", "", float(peak), MEMORY_BUCKETS)
    pipe.execute()


def read_histogram(r: redis.Redis, keys: Keys, name: str) -> dict[str, dict[str, float]]:
    """{label: {"<bucket bound>"|"+Inf"|"sum": value}} of one ops histogram (cumulative buckets)."""
    out: dict[str, dict[str, float]] = {}
    for field, value in r.hgetall(f"{keys.prefix}:metrics:{name}").items():
        label, _, bound = field.rpartition("|")
        out.setdefault(label, {})[bound] = float(value)
    return out
