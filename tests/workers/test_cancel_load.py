"""Cancel under load: a running job and a crowd of queued ones are cancelled at once while
clients poll the status endpoints; the worker is free within seconds, cancelled jobs never
offer partial results, and the job left alone still succeeds."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from spkd.core import store
from tests.helpers import KEY_A, Stack, dump, events, small_imagefolder, tiny_spec, wait_event, wait_final

pytestmark = pytest.mark.slow

N_QUEUED = 8


def _poll(url: str, key: str, job_ids: list[str], stop: threading.Event, codes: list[int]) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
        while not stop.is_set():
            codes.append(c.get("/v1/jobs", params={"limit": 50}).status_code)
            for i in job_ids[:3]:
                codes.append(c.get(f"/v1/jobs/{i}").status_code)


def test_cancel_running_and_queued_under_load(stack_factory, redis_url: str) -> None:
    st: Stack = stack_factory(redis_url)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=6)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    st.start_worker("w1")
    st.wait_ready()
    long_spec = tiny_spec(
        {"path": "hym"},
        teacher={"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": 50}},
    )
    with st.client() as c:
        running = c.post("/v1/jobs", json=long_spec).json()["id"]
        queued = [c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"] for _ in range(N_QUEUED)]
        keep = c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]
        wait_event(r, keys, running, lambda e: e["kind"] == "checkpoint", 180)

        stop, codes = threading.Event(), []
        args = (st.url, KEY_A, queued, stop, codes)
        pollers = [threading.Thread(target=_poll, args=args) for _ in range(3)]
        for t in pollers:
            t.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: c.post(f"/v1/jobs/{i}/cancel"), [running, *queued]))
        assert all(x.status_code == 200 for x in results), [x.text for x in results]
        assert all(x.json()["status"] == "cancelled" for x in results[1:])  # queued: at once
        job = wait_final(r, keys, running, 30)
        t_cancelled = time.monotonic() - t0
        started = wait_event(r, keys, keep, lambda e: e["data"].get("status") == "validating", 60)
        t_freed = started["ts"] - (time.time() - (time.monotonic() - t0))
        stop.set()
        for t in pollers:
            t.join(30)
        print(f"running job cancelled in {t_cancelled:.1f} s; next job started {t_freed:.1f} s after cancel;")
        print(f"{len(codes)} status requests during the cancels")
        assert job["status"] == "cancelled" and t_cancelled < 15, (job, st.logs())
        assert t_freed < 30
        assert set(codes) == {200}, set(codes)

        # Partial results of the cancelled job are not offered; checkpoints stay private.
        assert c.get(f"/v1/jobs/{running}/artifacts").json()["data"] == []
        for name in ("student/model.safetensors", "checkpoints/last.pt", "metrics.json"):
            assert c.get(f"/v1/jobs/{running}/artifacts/{name}").status_code == 404
        assert (Path(st.settings.artifact_root) / running).is_dir()  # there were files to leak
        for i in queued:  # a job cancelled while queued never started
            assert [e["data"]["status"] for e in events(r, keys, i) if e["kind"] == "status"] == [
                "queued",
                "cancelled",
            ], dump(events(r, keys, i))
        assert c.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelled"  # idempotent
        assert wait_final(r, keys, keep, 120)["status"] == "succeeded", st.logs()
        again = c.post(f"/v1/jobs/{keep}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
