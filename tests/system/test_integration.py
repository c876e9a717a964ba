"""The real thing on the CPU: uvicorn + a `spkd worker` subprocess + the real Redis.

upload -> create -> events (SSE) -> succeeded -> download -> load with timm; a cancelled running
job; a job that fails validation in the worker. Tiny timm models, 8 images per class and split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from spkd.cli.client import iter_sse
from tests.helpers import KEY_B, Service, small_imagefolder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker_env() -> dict[str, str]:
    # The DataLoader path (not the in-memory one, which small sets take): its loader processes
    # must start inside the Celery pool child that runs the job.
    return {"SPKD_DATA_PATH": "loader"}


def tiny_spec(ds_id: str, finetune: bool = True, **over: object) -> dict:
    """finetune=False skips the teacher stage: a shorter job where the test is not about it."""
    spec = {
        "teacher": {
            "model": "test_efficientnet",
            "weights": "none",
            **({"finetune": {"epochs": 1}} if finetune else {}),
        },
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": {"id": ds_id},
        # One loader process: the job runs in a Celery pool child, which must be allowed children.
        "train": {"epochs": 1, "batch_size": 4, "image_size": 64, "num_workers": 1, "lr": 0.01},
        "baseline": False,
    }
    spec.update(over)
    return spec


def wait_status(c: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


@pytest.fixture(scope="module")
def dataset_id(service: Service, small_zip: Path) -> str:
    with service.client() as c, small_zip.open("rb") as f:
        resp = c.post("/v1/datasets", files={"file": ("hym.zip", f, "application/zip")}, data={"name": "hym"})
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["layout"] == "split" and ds["classes"] == ["ants", "bees"]
    assert ds["counts"] == {"train": {"ants": 8, "bees": 8}, "val": {"ants": 8, "bees": 8}}
    return ds["id"]


def test_job_end_to_end(service: Service, dataset_id: str, tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import load_file

    with service.client() as c:
        t0 = time.monotonic()
        resp = c.post("/v1/jobs", json=tiny_spec(dataset_id), headers={"Idempotency-Key": "e2e-1"})
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        # The same key and body again: the same job, not a second one.
        again = c.post("/v1/jobs", json=tiny_spec(dataset_id), headers={"Idempotency-Key": "e2e-1"})
        assert again.status_code == 200 and again.json()["id"] == job_id

        seen = [(ev, data) for ev, data in iter_sse(c, job_id)]
        kinds = [ev for ev, _ in seen]
        statuses = [d["data"]["status"] for ev, d in seen if ev == "status"]
        assert statuses == ["queued", "validating", "running", "succeeded"], service.logs()
        assert kinds[-1] == "end" and seen[-1][1] == {"status": "succeeded"}
        assert "stage_started" in kinds and "epoch_end" in kinds
        print(f"POST -> succeeded in {time.monotonic() - t0:.1f} s")

        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["error"] is None
        assert 0.0 <= job["metrics"]["distilled"]["report_acc"] <= 1.0

        # The JSON event log holds the same entries, resumable with ?after=.
        log = c.get(f"/v1/jobs/{job_id}/events").json()["data"]
        assert [e["id"] for e in log] == [d["id"] for ev, d in seen if ev not in ("progress", "end")]
        tail = c.get(f"/v1/jobs/{job_id}/events", params={"after": log[1]["id"]}).json()["data"]
        assert tail == log[2:]

        arts = {a["name"]: a for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        assert {"student/model.safetensors", "student/config.json", "metrics.json"} <= set(arts)
        assert not any(n.startswith("checkpoints") for n in arts)
        dl = c.get(f"/v1/jobs/{job_id}/artifacts/student/model.safetensors")
        assert dl.status_code == 200 and len(dl.content) == arts["student/model.safetensors"]["size"]
        import hashlib

        assert hashlib.sha256(dl.content).hexdigest() == arts["student/model.safetensors"]["sha256"]
        cfg = c.get(f"/v1/jobs/{job_id}/artifacts/student/config.json").json()

        # Another key sees none of it.
        with service.client(KEY_B) as other:
            assert other.get(f"/v1/jobs/{job_id}").status_code == 404
            assert other.get(f"/v1/jobs/{job_id}/artifacts/student/model.safetensors").status_code == 404

    (tmp_path / "student.safetensors").write_bytes(dl.content)
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"])
    model.load_state_dict(load_file(tmp_path / "student.safetensors"))
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 2) and cfg["label_names"] == ["ants", "bees"]


def test_cancel_running_job_then_worker_takes_next(service: Service, dataset_id: str) -> None:
    long_spec = tiny_spec(
        dataset_id, train={"epochs": 50, "batch_size": 2, "image_size": 64, "num_workers": 0}
    )
    with service.client() as c:
        job_id = c.post("/v1/jobs", json=long_spec).json()["id"]
        queued_id = c.post("/v1/jobs", json=long_spec).json()["id"]  # waits behind the first
        nxt = c.post("/v1/jobs", json=tiny_spec(dataset_id, finetune=False)).json()["id"]
        wait_status(c, job_id, ("running",), 90)
        # Cancelled while queued: it never starts.
        assert c.post(f"/v1/jobs/{queued_id}/cancel").json()["status"] == "cancelled"
        # Wait for real training steps, then cancel: the engine stops within a step.
        deadline = time.monotonic() + 60
        while not (c.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("step"):
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.2)
        t0 = time.monotonic()
        resp = c.post(f"/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 200 and resp.json()["cancel_requested"] is True
        job = wait_status(c, job_id, ("cancelled", "failed", "succeeded"), 30)
        assert job["status"] == "cancelled", job
        print(f"cancel -> cancelled in {time.monotonic() - t0:.2f} s")
        # Cancelling again is a no-op; the next job still runs to the end on the same worker.
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        done = wait_status(c, nxt, ("succeeded", "failed", "cancelled"), 120)
        assert done["status"] == "succeeded", (done, service.logs())
        queued = c.get(f"/v1/jobs/{queued_id}").json()
        assert queued["status"] == "cancelled" and queued["started_at"] is None
        events = [e["kind"] for e in c.get(f"/v1/jobs/{queued_id}/events").json()["data"]]
        assert events == ["status", "status"]  # queued, cancelled: never validating or running


def test_worker_validation_failure(service: Service, dataset_id: str) -> None:
    bad = tiny_spec(dataset_id, distill={"layers": [{"teacher": "no_such_layer", "student": "layer4"}]})
    with service.client() as c:
        job_id = c.post("/v1/jobs", json=bad).json()["id"]
        job = wait_status(c, job_id, ("succeeded", "failed", "cancelled"), 90)
        assert job["status"] == "failed", job
        assert job["error"]["field"] and job["error"]["field"].startswith("distill.layers"), job["error"]
        assert job["error"]["code"] != "internal" and "no_such_layer" in job["error"]["message"]
        assert job["started_at"] is not None
        kinds = [
            (e["kind"], e["data"].get("status")) for e in c.get(f"/v1/jobs/{job_id}/events").json()["data"]
        ]
        assert ("status", "validating") in kinds and ("status", "running") not in kinds


def test_readyz_and_metrics(service: Service) -> None:
    ready = httpx.get(f"{service.url}/readyz").json()
    assert ready["status"] == "ready" and ready["workers"] == 1
    text = httpx.get(f"{service.url}/metrics").text
    assert 'spkd_http_requests_total{method="POST",route="/v1/jobs",status="201"}' in text
    assert 'spkd_jobs{status="succeeded"}' in text
    assert json.loads(json.dumps(ready))


def test_killed_job_process_resumes_once(service: Service, dataset_id: str) -> None:
    """SIGKILL the process running a job: Celery requeues the message (acks late, reject on worker
    lost), the next process takes over the dead holder's lease and the engine resumes."""
    import os
    import signal

    import redis

    from spkd.core import store

    r = redis.Redis.from_url(service.settings.redis_url, decode_responses=True)
    keys = store.Keys(service.settings.redis_prefix)
    spec = tiny_spec(
        dataset_id, finetune=False, train={"epochs": 3, "batch_size": 2, "image_size": 64, "num_workers": 0}
    )
    with service.client() as c:
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        deadline = time.monotonic() + 90
        while "checkpoint" not in [e["kind"] for e in c.get(f"/v1/jobs/{job_id}/events").json()["data"]]:
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.2)
        holder = r.get(keys.lease(job_id))
        os.kill(int(holder.split(":")[1]), signal.SIGKILL)
        job = wait_status(c, job_id, ("succeeded", "failed", "cancelled"), 120)
        assert job["status"] == "succeeded", (job, service.logs())
        assert job["attempts"] == 2
        messages = [e["message"] for e in c.get(f"/v1/jobs/{job_id}/events").json()["data"]]
        assert any("resuming" in m for m in messages)


def test_cli_submit_wait_status_download(service: Service, dataset_id: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    spkd = str(Path(sys.executable).parent / "spkd")
    env = dict(os.environ, SPKD_URL=service.url, SPKD_API_KEY="test-key-alice")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(tiny_spec(dataset_id, finetune=False)))
    out = subprocess.run(
        [spkd, "submit", str(job_file), "--wait"], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[0]
    assert "succeeded" in out.stderr and "running" in out.stderr
    st = subprocess.run(
        [spkd, "status", job_id, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(st.stdout)["status"] == "succeeded"
    dl = subprocess.run(
        [spkd, "download", job_id, "student/config.json", "-o", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dl.returncode == 0 and "sha256 ok" in dl.stderr, dl.stderr
    assert json.loads((tmp_path / job_id / "student" / "config.json").read_text())["num_classes"] == 2
    bad = subprocess.run([spkd, "status", "job_nope"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and "job_not_found" in bad.stderr

    folder = small_imagefolder(tmp_path / "mini", per_class=2)
    up = subprocess.run(
        [spkd, "datasets", "upload", str(folder), "--name", "mini"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 0, up.stderr
    ds_id = up.stdout.strip().splitlines()[-1]
    with service.client() as c:
        assert c.get(f"/v1/datasets/{ds_id}").json()["counts"]["val"] == {"ants": 2, "bees": 2}
