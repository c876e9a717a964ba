"""Load tests of the API: a held request rate while a job trains, or many open event streams.

Rate mode (default). Starts its own `spkd serve` + `spkd worker` on loopback (127.0.0.1 only, a
unique Redis prefix and queue), submits a tiny job long enough to outlast the load, and once it runs
sends an open-loop schedule of GET /v1/jobs/{id} and GET /v1/jobs (3:1) at --rate requests/s for
--duration s. Latency is measured from each request's scheduled time, so a server that falls behind
shows it (no coordinated omission). Bounded: at most --rate x --duration requests (<= 20000),
--max-inflight open requests, a hard wall-clock limit; the job is cancelled and everything removed
at the end.

    .venv/bin/python bench/load.py [--rate 100] [--duration 20] [--json out.json]

Prints the achieved rate, p50/p99/max per endpoint, errors, and the job's epochs during the load.
The load generator shares the cores with the server, Redis and the training job.

Streams mode (--streams N). Starts `spkd serve` alone (no worker) on loopback with two keys, A
and B, and SPKD_MAX_STREAMS_PER_KEY = N; a second process opens N server-sent-event streams as
key A on --jobs jobs and holds them. While they are open, for --duration s: key B's
GET /v1/jobs/{id} at --rate requests/s (open loop, latency from the scheduled time), a new key-B
stream every 0.25 s that must deliver a live event within 5 s (it resumes from the newest event
id, so only an event written after it opened counts), and a writer appending an event to B's job
and to one of A's jobs (in turn) --event-rate times a second (default 10) with
core/store.add_event. Redis connections of the API process (its sockets to Redis, matched with
CLIENT LIST) are sampled every second. Bounded: N <= 5000, --duration <= 120 s, every wait has
a deadline, and it stops and cleans up by itself.

    .venv/bin/python bench/load.py --streams 1000 --duration 20 [--json streams.json]
    .venv/bin/python bench/load.py --streams 1000 --jobs 1 --event-rate 2   # all on one busy job

Prints one table row: open streams, B's GET p50/p99, B's new streams delivered/attempted, the
API's Redis connections (all / streaming), the events A's held streams received and the API's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import KEY, ROOT, colour_folder, emit, pct, procs, sandbox, service_env, start_service  # noqa: E402

MAX_REQUESTS = 20_000
MAX_STREAMS = 5_000
KEY_B = "bench-key-other"
SSE = {"Accept": "text/event-stream"}


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
    ap.add_argument("--rate", type=float, default=None, help="requests per second (default 100; streams: 20)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (<= 120)")
    ap.add_argument("--max-inflight", type=int, default=32)
    ap.add_argument("--streams", type=int, default=0, help="streams mode: event streams to hold open")
    ap.add_argument("--jobs", type=int, default=50, help="streams mode: key A's jobs the streams follow")
    ap.add_argument(
        "--event-rate",
        type=float,
        default=10.0,
        help="streams mode: events/s the writer adds to B's job and to A's",
    )
    ap.add_argument("--redis-url", default=os.environ.get("SPKD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.rate = a.rate if a.rate is not None else (20.0 if a.streams else 100.0)
    if not 0 < a.duration <= 120 or not 0 < a.rate <= 2000:
        raise SystemExit("--duration must be in (0, 120] s and --rate in (0, 2000] req/s")
    if a.streams:
        if not 0 < a.streams <= MAX_STREAMS or not 0 < a.jobs <= a.streams or not 0 < a.event_rate <= 100:
            raise SystemExit(
                f"--streams must be in (0, {MAX_STREAMS}], --jobs in (0, --streams], --event-rate in (0, 100]"
            )
        emit(run_streams(a), a.json)
        return
    run_rate(a)


def run_rate(a: argparse.Namespace) -> None:
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


# ---------------------------------------------------------------- streams mode


def api_redis_clients(pid: int, r: redis.Redis) -> list[dict]:
    """CLIENT LIST entries of the connections process `pid` holds to this Redis (its sockets'
    local ports from /proc, matched with the addresses Redis sees)."""
    port = r.connection_pool.connection_kwargs.get("port", 6379)
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    local = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == port:
                local.add(int(cols[1].rsplit(":", 1)[1], 16))
    return [c for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in local]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hold_streams(url: str, jobs: list[str], n: int, deadline_s: float, conn) -> None:  # noqa: ANN001 (a Pipe end)
    """Child process: open `n` key-A streams over `jobs`, report how many opened, hold them until
    told to stop (or the deadline), then report the events they received."""
    asyncio.run(_hold_streams(url, jobs, n, deadline_s, conn))


async def _hold_streams(url: str, jobs: list[str], n: int, deadline_s: float, conn) -> None:  # noqa: ANN001
    # opened: answered 200 and sent its first line; refused: any other status; failed: no answer;
    # cut: opened, then broke off; ended: opened, then closed by the server (an error event...)
    counts = dict.fromkeys(("opened", "refused", "failed", "cut", "ended", "events", "errors"), 0)
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {KEY}", **SSE}
    gate = asyncio.Semaphore(50)  # opening (not holding): 50 handshakes at a time
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(60.0, read=None)
    ) as c:

        async def one(job: str) -> None:
            opened = False
            try:
                async with gate:
                    resp = await c.send(c.build_request("GET", f"/v1/jobs/{job}/events"), stream=True)
                    if resp.status_code != 200:
                        counts["refused"] += 1
                        await resp.aclose()
                        return
                    chunks = resp.aiter_bytes()
                    data = await anext(chunks)  # starts with "retry: 2000": the stream is open
                    counts["opened"] += 1
                    opened = True
                # Counted in the raw bytes (parsing every line of 1000 streams would make this
                # process the bottleneck); a marker split across two chunks is found in tail+chunk.
                tails = {b"event: info\n": b"", b"event: error\n": b""}
                while True:
                    for marker, tail in tails.items():
                        seen = tail + data
                        counts["events" if b"info" in marker else "errors"] += seen.count(marker)
                        tails[marker] = seen[-(len(marker) - 1) :]
                    try:
                        data = await anext(chunks)
                    except StopAsyncIteration:
                        break
                counts["ended"] += 1
                await resp.aclose()
            except (httpx.HTTPError, StopAsyncIteration):
                counts["cut" if opened else "failed"] += 1

        def report() -> dict:
            return dict(counts, open=counts["opened"] - counts["cut"] - counts["ended"])

        tasks = [asyncio.create_task(one(jobs[i % len(jobs)])) for i in range(n)]
        end = time.monotonic() + deadline_s
        while sum(counts[k] for k in ("opened", "refused", "failed")) < n and time.monotonic() < end:
            await asyncio.sleep(0.1)
        conn.send(report())
        while not conn.poll() and time.monotonic() < end:
            await asyncio.sleep(0.1)
        final = report()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn.send(final)


async def measure_other_key(
    url: str, job_id: str, rate: float, duration: float, newest_event: Callable[[], str]
) -> tuple[list[float], int, int, int]:
    """Key B while A's streams are held: GET /v1/jobs/{id} on an open-loop schedule (latency from
    the scheduled time), and a new stream every 0.25 s that must deliver a live event within 5 s.
    Returns latencies (s), GET errors, new streams attempted, new streams delivered."""
    n = min(int(rate * duration), MAX_REQUESTS)
    lat: list[float] = []
    errors, attempted, delivered = 0, 0, 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY_B}"}, limits=limits, timeout=10
    ) as c:

        async def get(due: float) -> None:
            nonlocal errors
            try:
                if (await c.get(f"/v1/jobs/{job_id}")).status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            lat.append(time.perf_counter() - due)

        async def new_stream() -> None:
            nonlocal attempted, delivered
            attempted += 1
            headers = {**SSE, "Last-Event-ID": newest_event()}
            try:
                async with asyncio.timeout(5.0):
                    async with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
                        if resp.status_code != 200:
                            return
                        async for line in resp.aiter_lines():
                            if line.startswith("event: info"):
                                delivered += 1
                                return
            except (TimeoutError, httpx.HTTPError):
                return

        tasks = []
        t0 = time.perf_counter()
        next_stream = 0.0
        for i in range(n):
            due = t0 + i / rate
            while (now := time.perf_counter()) < due:
                if now - t0 >= next_stream:
                    next_stream += 0.25
                    tasks.append(asyncio.create_task(new_stream()))
                await asyncio.sleep(min(due - now, 0.01))
            tasks.append(asyncio.create_task(get(due)))
        await asyncio.gather(*tasks)
    return lat, errors, attempted, delivered


def run_streams(a: argparse.Namespace) -> dict:
    from spkd.core import store

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * a.streams + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the server inherits it
    if want < a.streams + 256:
        raise SystemExit(f"open-file limit {want} is too low for {a.streams} streams (raise ulimit -n)")
    result: dict = {
        "streams_target": a.streams,
        "jobs": a.jobs,
        "duration_s": a.duration,
        "rate": a.rate,
        "event_rate": a.event_rate,
    }
    with sandbox("loadsse", a.redis_url) as (tmp, prefix):
        env = service_env(a.redis_url, prefix, prefix, tmp)
        env.update(SPKD_API_KEYS=f"{KEY},{KEY_B}", SPKD_MAX_STREAMS_PER_KEY=str(a.streams))
        r, keys = redis.Redis.from_url(a.redis_url, decode_responses=True), store.Keys(prefix)
        a_jobs = [
            store.create_job(r, keys, store.owner_of(KEY), {"name": f"a{i}"})["id"] for i in range(a.jobs)
        ]
        b_job = store.create_job(r, keys, store.owner_of(KEY_B), {"name": "b"})["id"]
        with procs.Group(tmp, cwd=ROOT, grace_s=20) as group:
            url = start_service(group, procs.free_port(), env, worker=False, timeout_s=60)  # 127.0.0.1
            api_pid = group.procs[0].pid
            parent, child = mp.Pipe()
            holder = mp.get_context("spawn").Process(
                target=hold_streams, args=(url, a_jobs, a.streams, a.duration + 120, child), daemon=True
            )
            holder.start()
            try:
                if not parent.poll(120):
                    raise SystemExit("the stream holder did not report within 120 s")
                opened = parent.recv()
                result["held"] = opened
                newest = {"id": store.list_events(r, keys, b_job)[-1]["id"]}
                stop = threading.Event()
                written = {"b": 0, "a": 0}

                def writer() -> None:
                    i = 0
                    while not stop.wait(1.0 / a.event_rate):
                        newest["id"] = store.add_event(r, keys, b_job, "info", f"b tick {i}") or newest["id"]
                        store.add_event(r, keys, a_jobs[i % len(a_jobs)], "info", f"a tick {i}")
                        written["b"] += 1
                        written["a"] += 1
                        i += 1

                conns: list[tuple[int, int]] = []

                def sampler() -> None:
                    while not stop.wait(1.0):
                        clients = api_redis_clients(api_pid, r)
                        conns.append((len(clients), sum(c.get("name") == "spkd-api-live" for c in clients)))

                threads = [threading.Thread(target=f, daemon=True) for f in (writer, sampler)]
                for t in threads:
                    t.start()
                cpu0, hcpu0, t0 = cpu_seconds(api_pid), cpu_seconds(holder.pid), time.monotonic()
                lat, errors, attempted, delivered = asyncio.run(
                    measure_other_key(url, b_job, a.rate, a.duration, lambda: newest["id"])
                )
                wall = time.monotonic() - t0
                api_cpu, holder_cpu = (
                    (cpu_seconds(api_pid) - cpu0) / wall,
                    (cpu_seconds(holder.pid) - hcpu0) / wall,
                )
                stop.set()
                for t in threads:
                    t.join(10)
                parent.send("stop")
                held = parent.recv() if parent.poll(60) else {}
            finally:
                holder.join(30)
                if holder.is_alive():
                    holder.kill()
            api_log = (tmp / "api.log").read_text() if (tmp / "api.log").exists() else ""
    result.update(
        held_end=held,
        other_get={
            "n": len(lat),
            "errors": errors,
            "p50_ms": round(pct(lat, 50) * 1000, 2) if lat else None,
            "p99_ms": round(pct(lat, 99) * 1000, 2) if lat else None,
            "max_ms": round(max(lat) * 1000, 2) if lat else None,
        },
        other_new_streams={"attempted": attempted, "delivered": delivered},
        api_redis_connections={
            "max_all": max((c[0] for c in conns), default=None),
            "max_streaming": max((c[1] for c in conns), default=None),
            "samples": len(conns),
        },
        events_written=written,
        api_cpu_percent=round(100 * api_cpu, 1),
        holder_cpu_percent=round(100 * holder_cpu, 1),  # the process holding the streams
        host_load_1min=round(os.getloadavg()[0], 2),
        api_log_tracebacks=api_log.count("Traceback"),
    )
    _print_streams_table(result)
    return result


def _print_streams_table(res: dict) -> None:
    g, s, c = res["other_get"], res["other_new_streams"], res["api_redis_connections"]
    h0, h1 = res["held"], res["held_end"]
    head = (
        "| A streams open (start / end) | B GET p50 ms | B GET p99 ms "
        "| B new streams delivered/attempted | API Redis conns all / streaming "
        "| events to A's streams | API CPU % | API tracebacks |"
    )
    row = (
        f"| {h0.get('open')} / {h1.get('open')} | {g['p50_ms']} | {g['p99_ms']} "
        f"| {s['delivered']}/{s['attempted']} | {c['max_all']} / {c['max_streaming']} "
        f"| {h1.get('events')} | {res['api_cpu_percent']} | {res['api_log_tracebacks']} |"
    )
    print(head, "|---|---|---|---|---|---|---|---|", row, sep="\n")


if __name__ == "__main__":
    main()
