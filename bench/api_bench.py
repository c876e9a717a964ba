"""API benchmark against a real `spkd serve` (uvicorn) and the real Redis, loopback only.

Measures p50/p99 latency and requests/s of POST /v1/jobs and GET /v1/jobs/{id} (sequential and
with concurrent clients), and the time from POST to a real `spkd worker` starting the job.
Everything runs under a unique Redis key prefix and Celery queue, removed at the end.

    .venv/bin/python bench/api_bench.py [--requests 400] [--concurrency 8] [--start-jobs 5] [--json out.json]

Note: the load generator shares the machine's cores with the server (and Redis), so numbers on a
small box are a lower bound of what the API does on its own host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import KEY, ROOT, colour_folder, emit, pct, procs, sandbox, service_env, start_service  # noqa: E402


def summary(name: str, lat: list[float], wall: float) -> dict:
    return {
        "name": name,
        "n": len(lat),
        "p50_ms": round(pct(lat, 50) * 1000, 2),
        "p99_ms": round(pct(lat, 99) * 1000, 2),
        "mean_ms": round(statistics.mean(lat) * 1000, 2),
        "req_per_s": round(len(lat) / wall, 1),
    }


def spec() -> dict:
    return {
        "teacher": {"model": "test_efficientnet", "weights": "none"},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": {"path": "bench"},
        "train": {"epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0},
        # A layer the teacher does not have: the worker starts the job, validates, fails fast.
        "distill": {"layers": [{"teacher": "no_such_layer", "student": "layer4"}]},
        "baseline": False,
    }


async def run_load(url: str, method: str, paths: list[str], concurrency: int) -> tuple[list[float], float]:
    lat: list[float] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    body = spec()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits
    ) as c:

        async def worker() -> None:
            while not queue.empty():
                path = queue.get_nowait()
                t = time.perf_counter()
                resp = await (c.post(path, json=body) if method == "POST" else c.get(path))
                lat.append(time.perf_counter() - t)
                if resp.status_code >= 300:
                    raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, time.perf_counter() - t0


def post_to_start(url: str, n: int, settle_s: float) -> dict:
    """Sequential jobs: POST -> `validating` (the worker's job process began) and -> final.
    settle_s > 0: wait that long after each job, so the worker has replaced its job process and
    is idle (the usual case); 0: back to back, so the next POST also waits for that turnover."""
    to_start, to_done = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        for _ in range(n):
            time.sleep(settle_s)
            t0 = time.time()
            job = c.post("/v1/jobs", json=spec()).json()
            while True:
                events = c.get(f"/v1/jobs/{job['id']}/events").json()
                started = [e for e in events["data"] if e["data"].get("status") == "validating"]
                if events["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            to_start.append(_unix(started[0]["created_at"]) - t0)
            to_done.append(_unix(events["data"][-1]["created_at"]) - t0)
    return {
        "n": n,
        "settle_s": settle_s,
        "post_to_start_s": {"p50": round(pct(to_start, 50), 3), "max": round(max(to_start), 3)},
        "post_to_final_s": {"p50": round(pct(to_done, 50), 3), "max": round(max(to_done), 3)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--start-jobs", type=int, default=5)
    ap.add_argument("--redis-url", default=os.environ.get("SPKD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    results: dict = {"host_cpus": os.cpu_count()}
    with sandbox("bench", a.redis_url) as (tmp, prefix):
        colour_folder(tmp / "data" / "bench", per_class=4)
        port = procs.free_port()
        env = service_env(a.redis_url, prefix, f"{prefix}-load", tmp)

        # Phase 1: latency and throughput, no worker consuming (jobs stay queued).
        with procs.Group(tmp, cwd=ROOT, grace_s=20) as group:
            url = start_service(group, port, env, worker=False, timeout_s=30)
            asyncio.run(run_load(url, "POST", ["/v1/jobs"] * 20, 2))  # warm-up
            runs = []
            for conc in (1, a.concurrency):
                lat, wall = asyncio.run(run_load(url, "POST", ["/v1/jobs"] * a.requests, conc))
                runs.append(summary(f"POST /v1/jobs c={conc}", lat, wall))
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as c:
                ids = [j["id"] for j in c.get("/v1/jobs", params={"limit": 100}).json()["data"]]
            for conc in (1, a.concurrency):
                paths = [f"/v1/jobs/{ids[i % len(ids)]}" for i in range(a.requests * 2)]
                lat, wall = asyncio.run(run_load(url, "GET", paths, conc))
                runs.append(summary(f"GET /v1/jobs/{{id}} c={conc}", lat, wall))
            results["latency"] = runs

        # Phase 2: POST -> worker start, on a fresh queue with one real worker.
        env["SPKD_QUEUE"] = f"{prefix}-start"
        with procs.Group(tmp, cwd=ROOT, grace_s=20) as group:
            url = start_service(group, port, env, worker=True, timeout_s=90, api_log="api2")
            results["post_to_start_idle"] = post_to_start(url, a.start_jobs, settle_s=8.0)
            results["post_to_start_back_to_back"] = post_to_start(url, a.start_jobs, settle_s=0.0)
    emit(results, a.json)


def _unix(iso: str) -> float:
    """An API time (ISO 8601, UTC) as unix seconds."""
    return datetime.fromisoformat(iso).timestamp()


if __name__ == "__main__":
    main()
