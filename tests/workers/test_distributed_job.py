"""A 2-rank job (train.devices: 2) through the real API and a real `spkd worker` that owns two
devices (`--gpus 0,1`; two gloo ranks on this CPU box): routed to that worker, trained on both
ranks, reported once, finished with its artifacts; then a 2-rank job cancelled mid-distill."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spkd.core import store
from tests.helpers import (
    Stack,
    dump,
    epoch_ends,
    events,
    small_imagefolder,
    tiny_spec,
    wait_event,
    wait_final,
)

pytestmark = pytest.mark.slow


def test_a_two_device_job_runs_on_a_two_device_worker(stack_factory, redis_url: str) -> None:
    st: Stack = stack_factory(redis_url)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=6)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    st.start_worker("pair", env={"SPKD_DEVICE": "cpu"}, options=["--gpus", "0,1"])  # 2 gloo ranks here
    st.wait_ready()
    spec = tiny_spec(
        {"path": "hym"},
        train={"epochs": 2, "batch_size": 4, "image_size": 32, "num_workers": 0, "devices": 2},
    )
    with st.client() as c:
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        job = wait_final(r, keys, job_id, 300)
        evs = events(r, keys, job_id)
        assert job["status"] == "succeeded", dump(evs) + st.logs()
        assert not any(e["data"].get("code") == "no_worker_fits" for e in evs)  # the pair is live
        assert any(e["kind"] == "info" and e["data"].get("devices") == 2 for e in evs), dump(evs)
        assert epoch_ends(evs) == [("distill", 1), ("distill", 2)]  # one rank reports
        names = {a["name"] for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        assert {"student/model.safetensors", "metrics.json", "student.onnx"} <= names

        # A cancel mid-distill ends the job `cancelled` within seconds, and no rank outlives it.
        long = tiny_spec(
            {"path": "hym"},
            train={"epochs": 30, "batch_size": 4, "image_size": 32, "num_workers": 0, "devices": 2},
        )
        job_id = c.post("/v1/jobs", json=long).json()["id"]
        wait_event(
            r, keys, job_id, lambda e: e["kind"] == "checkpoint" and e["data"]["stage"] == "distill", 300
        )
        assert _ranks_of(job_id), "the job's rank 1 is not running"
        asked = time.monotonic()
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        job = wait_final(r, keys, job_id, 60)
        took = time.monotonic() - asked
        assert job["status"] == "cancelled", dump(events(r, keys, job_id))
        deadline = time.monotonic() + 15
        while _ranks_of(job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        print(f"cancelled in {took:.1f}s; ranks gone {time.monotonic() - asked:.1f}s after the cancel")
        assert not _ranks_of(job_id) and took < 20


def _ranks_of(job_id: str) -> list[int]:
    """Pids of the rank processes (models.training.ranks) of this job still running."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] if cmd else "X"
        except (OSError, IndexError):
            continue
        if b"rank_main" in cmd and job_id.encode() in cmd and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids
