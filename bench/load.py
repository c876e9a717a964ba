"""Load test: hold a stated request rate on the status endpoints while a job trains.

Starts its own `spkd serve` + `spkd worker` on loopback (127.0.0.1 only, a unique Redis prefix and
queue), submits a tiny job long enough to outlast the load, and once it runs sends an open-loop
schedule of GET /v1/jobs/{id} and GET /v1/jobs (3:1) at --rate requests/s for --duration s.
Latency is measured from each request's scheduled time, so a server that falls behind shows it
(no coordinated omission). Bounded: at most --rate x --duration requests (<= 20000), --max-inflight
open requests, a hard wall-clock limit; the job is cancelled and everything removed at the end.

    .venv/bin/python bench/load.py [--rate 100] [--duration 20] [--json out.json]

Prints the achieved rate, p50/p99/max per endpoint, errors, and the job's epochs during the load.
The load generator shares the cores with the server, Redis and the training job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import KEY, ROOT, colour_folder, emit, pct, procs, sandbox, service_env, start_service  # noqa: E402

MAX_REQUESTS = 20_000


def job_spec() -> dict:
    """Tiny models on 16 generated images; enough fine-tune epochs to outlast the load."""
    return {
        "teacher": {"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": 500}},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": {"path": "load"},
        "train": {"epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0},
        "baseline": False,
    }


async def hold_rate(
    url: str, job_id: str, rate: float, duration: float, max_inflight: int
) -> tuple[dict[str, list[float]], int, int, float]:
    """Open loop: request i is due at t0 + i/rate. Returns latencies per endpoint, errors,
    requests skipped because max_inflight was reached, and the wall time."""
    n = min(int(rate * duration), MAX_REQUESTS)
    paths = [
        ("GET /v1/jobs", "/v1/jobs?limit=20") if i % 4 == 3 else ("GET /v1/jobs/{id}", f"/v1/jobs/{job_id}")
        for i in range(n)
    ]
    lat: dict[str, list[float]] = {"GET /v1/jobs/{id}": [], "GET /v1/jobs": []}
    errors, skipped = 0, 0
    sem = asyncio.Semaphore(max_inflight)
    limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=10
    ) as c:

        async def one(name: str, path: str, due: float) -> None:
            nonlocal errors
            try:
                resp = await c.get(path)
                if resp.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            finally:
                sem.release()
            lat[name].append(time.perf_counter() - due)

        tasks = []
        t0 = time.perf_counter()
        for i, (name, path) in enumerate(paths):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem.locked():
                skipped += 1  # the server is this far behind: count it, do not queue unboundedly
                continue
            await sem.acquire()
            tasks.append(asyncio.create_task(one(name, path, due)))
        await asyncio.gather(*tasks)
        return lat, errors, skipped, time.perf_counter() - t0


def epochs_done(c: httpx.Client, job_id: str) -> int:
    events = c.get(f"/v1/jobs/{job_id}/events", params={"limit": 10000}).json()["data"]
    return sum(e["kind"] == "epoch_end" for e in events)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second to hold")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (<= 120)")
    ap.add_argument("--max-inflight", type=int, default=32)
    ap.add_argument("--redis-url", default=os.environ.get("SPKD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not 0 < a.duration <= 120 or not 0 < a.rate <= 2000:
        raise SystemExit("--duration must be in (0, 120] s and --rate in (0, 2000] req/s")

    result: dict = {"rate_target": a.rate, "duration_s": a.duration, "host_cpus": os.cpu_count()}
    with sandbox("load", a.redis_url) as (tmp, prefix):
        colour_folder(tmp / "data" / "load", per_class=8)
        env = service_env(a.redis_url, prefix, prefix, tmp)
        with procs.Group(tmp, cwd=ROOT, grace_s=20) as group:
            url = start_service(group, procs.free_port(), env, worker=True, timeout_s=120)  # 127.0.0.1
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
                job_id = c.post("/v1/jobs", json=job_spec()).json()["id"]
                deadline = time.monotonic() + 120
                while epochs_done(c, job_id) < 1:
                    if time.monotonic() > deadline:
                        raise SystemExit(
                            f"the job did not start training: {c.get(f'/v1/jobs/{job_id}').text}"
                        )
                    time.sleep(0.5)
                before = epochs_done(c, job_id)
                lat, errors, skipped, wall = asyncio.run(
                    hold_rate(url, job_id, a.rate, a.duration, a.max_inflight)
                )
                after = epochs_done(c, job_id)
                status = c.get(f"/v1/jobs/{job_id}").json()["status"]
                c.post(f"/v1/jobs/{job_id}/cancel")
        done = sum(len(v) for v in lat.values())
        result.update(
            requests=done,
            errors=errors,
            skipped_over_inflight=skipped,
            achieved_rate=round(done / wall, 1),
            job_status_during=status,
            job_epochs_during_load=after - before,
            endpoints={
                name: {
                    "n": len(v),
                    "p50_ms": round(pct(v, 50) * 1000, 2),
                    "p99_ms": round(pct(v, 99) * 1000, 2),
                    "max_ms": round(max(v) * 1000, 2),
                }
                for name, v in lat.items()
                if v
            },
        )
    emit(result, a.json)


if __name__ == "__main__":
    main()
