"""Workers and the API die mid-job (SIGKILL, no cleanup): the job is picked up again, resumes
from its last checkpoint, never runs in two places at once, and ends succeeded with every artifact.
One job goes through all of it (a run per fault would cost a minute each on a small CPU box).

Real uvicorn, real `spkd worker` processes (Celery prefork), the real Redis, tiny timm models.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from spkd.core import store
from spkd.core.queue import enqueue, make_celery
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

ARTIFACTS = {  # the top-level files; each model is a folder (student/, teacher/)
    "metrics.json",
    "student.onnx",
    "report.html",
    "curves.png",
}
EPOCHS = 3


def _checkpoint(stage: str, epoch: int):
    return lambda e: e["kind"] == "checkpoint" and e["data"] == {"stage": stage, "epoch": epoch}


def _resumed(e: dict) -> bool:
    return "resuming from checkpoint" in e["message"]


def _started(stage: str):
    return lambda e: e["kind"] == "stage_started" and e["data"].get("stage") == stage


def _assert_complete(c, job_id: str, evs: list[dict]) -> None:
    """Every epoch of every stage ran exactly once (a resume never redoes a checkpointed epoch,
    and two runners would log an epoch twice), and every artifact downloads intact."""
    expected = [(s, e) for s in ("teacher_finetune", "distill") for e in range(1, EPOCHS + 1)]
    assert epoch_ends(evs) == expected, dump(evs)
    job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert [len(job["metrics"]["curves"][s]) for s in ("teacher_finetune", "distill")] == [EPOCHS] * 2
    arts = {a["name"]: a for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert {n for n in arts if "/" not in n} == ARTIFACTS
    for folder in ("student", "teacher"):  # timm's hub layout of each model
        assert {f"{folder}/config.json", f"{folder}/model.safetensors", f"{folder}/README.md"} <= set(arts)
    for stage in ("teacher_finetune", "distill"):  # the TensorBoard event files of each stage
        assert any(n.startswith(f"tensorboard/{stage}/") for n in arts), sorted(arts)
    for name, meta in arts.items():
        body = c.get(f"/v1/jobs/{job_id}/artifacts/{name}").content
        assert len(body) == meta["size"] > 0 and hashlib.sha256(body).hexdigest() == meta["sha256"]


def test_worker_and_api_killed_in_finetune_distill_and_export(stack_factory, redis_url: str) -> None:
    st: Stack = stack_factory(redis_url, max_attempts=6)
    data = small_imagefolder(Path(st.settings.data_root) / "hym", per_class=6)
    assert data.is_dir()
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    st.start_worker("w1")
    st.wait_ready()
    spec = tiny_spec(
        {"path": "hym"},
        teacher={"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": EPOCHS}},
        train={"epochs": EPOCHS, "batch_size": 4, "image_size": 32, "num_workers": 0},
    )
    with st.client() as c:
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        t0 = time.monotonic()

        # 1. The whole worker (parent and job process) dies during teacher fine-tuning.
        ev = wait_event(r, keys, job_id, _checkpoint("teacher_finetune", 1), 180)
        st.kill_worker("w1")
        assert store.get_job(r, keys, job_id)["status"] == "running"
        st.start_worker("w2")
        st.start_worker("w3")  # two workers from now on: the lease must keep the job in one place
        resumed = wait_event(r, keys, job_id, _resumed, 120, ev["id"])
        assert "teacher_finetune epoch 1" in resumed["message"], resumed

        # A duplicate delivery while it runs: the idle worker must refuse it (lease held).
        enqueue(make_celery(st.settings), st.settings, job_id)

        # 2. Only the job process dies during distillation; the worker parent survives.
        ev = wait_event(r, keys, job_id, _checkpoint("distill", 1), 180, resumed["id"])
        runner = store.get_job(r, keys, job_id)["worker"]
        assert st.kill_job_process(runner) == 1
        resumed = wait_event(r, keys, job_id, _resumed, 120, ev["id"])
        assert "distill epoch 1" in resumed["message"], resumed

        # 3. The worker dies while exporting (all training done and checkpointed).
        ev = wait_event(r, keys, job_id, _started("export"), 180, resumed["id"])
        runner = store.get_job(r, keys, job_id)["worker"]
        st.kill_worker(runner)
        assert store.get_job(r, keys, job_id)["status"] == "running", "export finished before the kill"
        st.start_worker("w4")
        # 4. The API dies as well: the job resumes and exports without it.
        st.kill_api()
        resumed = wait_event(r, keys, job_id, _resumed, 120, ev["id"])
        assert "after teacher_finetune, distill, evaluate" in resumed["message"], resumed
        wait_event(r, keys, job_id, _started("export"), 120, resumed["id"])
        st.start_api()
        st.wait_api()

        job = wait_final(r, keys, job_id, 180)
        print(f"3 kills, succeeded after {time.monotonic() - t0:.1f} s, attempts={job['attempts']}")
        evs = events(r, keys, job_id)
        assert job["status"] == "succeeded", dump(evs) + st.logs()
        _assert_complete(c, job_id, evs)
        starts = [e for e in evs if e["kind"] == "status" and e["data"]["status"] == "validating"]
        assert len(starts) == job["attempts"] == 4, dump(evs)
        assert sum(e["kind"] == "stage_started" and e["data"]["stage"] == "export" for e in evs) == 2
    assert "another worker holds its lease" in st.logs()
