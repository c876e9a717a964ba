"""Redis dies (SIGKILL) while one job runs and another waits, then comes back from its AOF: the API
answers 503 + Retry-After (never 500) meanwhile, the workers reconnect, and every job ends.

A private redis-server (appendonly yes, appendfsync always) on its own port; real uvicorn and a
real `spkd worker`; tiny timm models."""

from __future__ import annotations

import io
import time
import zipfile
from collections import Counter
from pathlib import Path

import httpx
import pytest

from spkd.core import references, store
from tests.helpers import (
    PrivateRedis,
    Stack,
    dump,
    epoch_ends,
    events,
    small_imagefolder,
    tiny_spec,
    wait_event,
)

pytestmark = pytest.mark.slow

DOWN_S = 6.0


def _valid_zip(photos: Path) -> bytes:
    """A dataset zip the upload accepts (real photos, two classes), so its only way to fail is
    saving the record: a zip refused for its content would answer 422 without touching Redis."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in ("ants", "bees"):
            for p in sorted((photos / "train" / cls).iterdir())[:2]:
                zf.write(p, f"{cls}/{p.name}")
    return buf.getvalue()


def _probe(c: httpx.Client, job_id: str, zip_bytes: bytes) -> list[tuple[str, int, str | None]]:
    """One round of every kind of request while Redis is down."""
    zip_body = {"content": zip_bytes, "headers": {"Content-Type": "application/zip"}}
    calls = [
        ("GET /v1/jobs", lambda: c.get("/v1/jobs")),
        ("GET job", lambda: c.get(f"/v1/jobs/{job_id}")),
        ("GET events", lambda: c.get(f"/v1/jobs/{job_id}/events")),
        ("GET events SSE", lambda: c.get(f"/v1/jobs/{job_id}/events?stream=true")),
        ("GET artifacts", lambda: c.get(f"/v1/jobs/{job_id}/artifacts")),
        ("POST cancel", lambda: c.post("/v1/jobs/job_nope/cancel")),
        ("POST job", lambda: c.post("/v1/jobs", json=tiny_spec({"path": "hym"}))),
        ("GET datasets", lambda: c.get("/v1/datasets")),
        ("POST dataset", lambda: c.post("/v1/datasets", **zip_body)),
        ("GET readyz", lambda: c.get("/readyz")),
        ("GET metrics", lambda: c.get("/metrics")),
    ]  # fmt: skip
    out = []
    for name, call in calls:
        resp = call()
        out.append((name, resp.status_code, resp.headers.get("retry-after")))
    return out


def test_redis_killed_and_restarted(private_redis: PrivateRedis, stack_factory) -> None:
    # A lease longer than the outage: the running job should ride it out without a restart.
    st: Stack = stack_factory(private_redis.url, lease_ttl_s=20.0)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=6)
    zip_bytes = _valid_zip(Path(st.settings.data_root) / "hym")
    r, keys = store.connect(private_redis.url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    st.start_worker("w1")
    st.wait_ready()
    long_spec = tiny_spec(
        {"path": "hym"},
        teacher={"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": 2}},
        train={"epochs": 3, "batch_size": 4, "image_size": 32, "num_workers": 0},
    )
    with st.client(timeout=20) as c:
        ids = [c.post("/v1/jobs", json=long_spec).json()["id"]]
        ids.append(c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"])
        wait_event(r, keys, ids[0], lambda e: e["kind"] == "checkpoint", 180)
        assert [store.get_job(r, keys, i)["status"] for i in ids] == ["running", "queued"]

        private_redis.kill()
        seen: list[tuple[str, int, str | None]] = []
        t_down = time.monotonic()
        while time.monotonic() - t_down < DOWN_S:
            seen += _probe(c, ids[0], zip_bytes)
        private_redis.start()
        codes = Counter((name, code) for name, code, _ in seen)
        print("while Redis was down:", dict(codes))
        bad = [(n, code, ra) for n, code, ra in seen if n != "GET metrics" and (code != 503 or ra is None)]
        assert not bad, (bad, st.logs())
        assert not [x for x in seen if x[1] >= 500 and x[1] != 503], seen

        # Back up: the API answers again and nothing created during the outage half-exists.
        deadline = time.monotonic() + 30
        while c.get("/v1/jobs").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        listed = {j["id"] for j in c.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        assert listed == set(ids), listed
        # Uploads refused for want of Redis left neither a record nor files behind.
        assert c.get("/v1/datasets").json()["data"] == []
        assert sorted(p.name for p in references.datasets_dir(st.settings).iterdir()) == []

        finals = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(finals) < len(ids):
            for i in ids:
                job = c.get(f"/v1/jobs/{i}").json()
                if job["status"] in store.FINAL:
                    finals[i] = job
            time.sleep(1)
        assert len(finals) == len(ids), (finals.keys(), st.logs())
        for i in ids:
            evs = events(r, keys, i)
            assert finals[i]["status"] == "succeeded", dump(evs) + st.logs()
            assert len(c.get(f"/v1/jobs/{i}/artifacts").json()["data"]) >= 8
        ends = epoch_ends(events(r, keys, ids[0]))
        # The running job waited for Redis and went on: one attempt, every epoch once.
        assert ends == [("teacher_finetune", 1), ("teacher_finetune", 2)] + [
            ("distill", e) for e in (1, 2, 3)
        ]
        assert finals[ids[0]]["attempts"] == 1, dump(events(r, keys, ids[0]))
        assert c.get("/readyz").status_code == 200
