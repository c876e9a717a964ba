"""Broken jobs end `failed` with a named code, never `succeeded`, and every
JSON the service writes is strict (no bare NaN).

A real `spkd serve` + `spkd worker` on loopback and the real Redis; tiny timm models on generated
images under the data root. NaN is made with a learning rate and an SP weight far too large.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from spkd.core import store
from tests.helpers import Service, make_folder

pytestmark = pytest.mark.slow

FINAL = ("succeeded", "failed", "cancelled")


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _spec(path: str, **over: object) -> dict:
    spec: dict = {
        "teacher": {"model": "test_resnet", "weights": "none", "image_size": 32},
        "student": {"model": "test_efficientnet", "weights": "none"},
        "dataset": {"path": path},
        "train": {"epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0},
        "baseline": False,
    }
    spec.update(over)
    return spec


@pytest.fixture(scope="module")
def folders(service: Service) -> dict[str, str]:
    root = Path(service.settings.data_root)
    for name, classes in (("colors", ("blue", "red")), ("pets", ("cat", "dog"))):
        make_folder(root / name / "train", dict.fromkeys(classes, 8), seed=1)
        make_folder(root / name / "val", dict.fromkeys(classes, 4), seed=2)
    return {"colors": "colors", "pets": "pets"}


def _run(c: httpx.Client, spec: dict, timeout: float = 180) -> dict:
    resp = c.post("/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = c.get(f"/v1/jobs/{job_id}")
        job = _strict(raw.text)
        if job["status"] in FINAL:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def _events(c: httpx.Client, job_id: str) -> list[dict]:
    return _strict(c.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).text)["data"]


def _sse_frames(c: httpx.Client, job_id: str) -> list[tuple[str, object]]:
    """Every frame of the (finished) job's event stream, its data parsed as strict JSON."""
    frames, event = [], "message"
    headers = {"Accept": "text/event-stream"}
    with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                frames.append((event, _strict(line[5:].strip())))
                if event == "end":
                    break
    return frames


def test_exploding_job_fails_with_non_finite_loss(service: Service, folders: dict[str, str]) -> None:
    spec = _spec(
        folders["colors"],
        train={"epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0, "lr": 1.0},
        distill={"sp_weight": 1e6, "layers": [{"teacher": "auto", "student": "auto", "weight": 1e6}]},
    )
    with service.client() as c:
        job = _run(c, spec)
        assert job["status"] == "failed", (job, service.logs())
        assert job["error"]["code"] == "non_finite_loss", job["error"]
        assert "distill epoch 1 step" in job["error"]["message"]
        assert job["metrics"] is None
        statuses = [e["data"].get("status") for e in _events(c, job["id"]) if e["kind"] == "status"]
        assert "succeeded" not in statuses and statuses[-1] == "failed"
        assert _strict(c.get(f"/v1/jobs/{job['id']}/artifacts").text)["data"] == []
        frames = _sse_frames(c, job["id"])
        assert frames[-1] == ("end", {"status": "failed"})
    # what the worker wrote in Redis is strict JSON too
    r = store.connect(service.settings.redis_url)
    keys = store.Keys(service.settings.redis_prefix)
    for _id, fields in r.xrange(keys.events(job["id"])):
        _strict(fields["data"])
    for name in ("progress", "error", "spec", "warnings"):
        raw = r.hget(keys.job(job["id"]), name)
        if raw:
            _strict(raw)


def test_vit_misfit_fails_before_training(service: Service, folders: dict[str, str]) -> None:
    spec = _spec(
        folders["colors"],
        teacher={"model": "test_resnet", "weights": "none", "finetune": {"epochs": 1}},
        student={"model": "test_vit", "weights": "none"},
        train={"epochs": 1, "batch_size": 4, "image_size": 36, "num_workers": 0},
    )
    with service.client() as c:
        job = _run(c, spec)
        assert job["status"] == "failed", (job, service.logs())
        assert job["error"]["code"] == "model_input_mismatch" and job["error"]["field"] == "train.image_size"
        assert "test_vit" in job["error"]["message"] and "36" in job["error"]["message"]
        kinds = [e["kind"] for e in _events(c, job["id"])]
        assert "stage_started" not in kinds and "epoch_end" not in kinds


def test_job_teacher_trained_on_other_classes_is_refused(service: Service, folders: dict[str, str]) -> None:
    """Job A fine-tunes a teacher on cat/dog; job B reuses it as-is on blue/red: same count, other names."""
    with service.client() as c:
        first = _run(
            c,
            _spec(
                folders["pets"],
                teacher={"model": "test_resnet", "weights": "none", "finetune": {"epochs": 1}},
            ),
        )
        assert first["status"] == "succeeded", (first, service.logs())
        reuse = _spec(folders["colors"], teacher={"model": "test_resnet", "weights": f"job:{first['id']}"})
        job = _run(c, reuse)
        assert job["status"] == "failed", (job, service.logs())
        error = job["error"]
        assert error["code"] == "class_mismatch" and error["field"] == "teacher.weights", error
        assert "['cat', 'dog']" in error["message"] and "['blue', 'red']" in error["message"]
