"""Data lifecycle against the real Redis and the app in-process:
DELETE of jobs and datasets (refused while in use, another key's is a 404 like a missing one),
what a delete removes, late writes of a dying worker that must not recreate a deleted job,
resume's refusals, retention, and the sweep of leftovers when the API starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from spkd.app.main import create_app
from spkd.core import storage, store
from spkd.core.settings import Settings
from spkd.core.store import jobs as store_jobs
from spkd.workers.reporter import Monitor, RedisReporter
from tests.helpers import KEY_A, KEY_B, make_settings, tiny_spec

BOB = {"Authorization": f"Bearer {KEY_B}"}


def _job(client, settings: Settings, idem: str | None = None) -> str:
    (Path(settings.data_root) / "hym").mkdir(exist_ok=True)
    headers = {"Idempotency-Key": idem} if idem else {}
    resp = client.post("/v1/jobs", json=tiny_spec({"path": "hym"}), headers=headers)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()["id"]


def _job_keys(r, keys: store.Keys, job_id: str) -> list[str]:
    names = [keys.job(job_id), keys.events(job_id), keys.artifacts(job_id), keys.idem_of(job_id)]
    return [k for k in names if r.exists(k)]


def test_delete_job(client, settings: Settings, r, keys: store.Keys) -> None:
    job_id = _job(client, settings, idem="first")
    out = storage.job_dir(settings, job_id)
    (out / "checkpoints").mkdir(parents=True)
    (out / "student.onnx").write_bytes(b"onnx")
    store.set_artifacts(r, keys, job_id, [{"name": "student.onnx", "size": 4, "sha256": "x"}])

    active = client.delete(f"/v1/jobs/{job_id}")
    assert active.status_code == 409, active.text
    assert active.json()["error"]["code"] == "job_active" and active.json()["error"]["status"] == "queued"
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"

    assert client.delete(f"/v1/jobs/{job_id}", headers=BOB).status_code == 404  # another key's: unknown
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200

    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    for path in ("", "/events", "/artifacts", "/artifacts/student.onnx"):
        assert client.get(f"/v1/jobs/{job_id}{path}").status_code == 404, path
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert client.get("/v1/jobs").json()["data"] == []
    assert _job_keys(r, keys, job_id) == []
    assert all(not r.zscore(keys.status(s), job_id) for s in store.STATUSES)
    assert not out.exists()
    # The Idempotency-Key that named it is forgotten: the same request makes a new job.
    again = client.post("/v1/jobs", json=tiny_spec({"path": "hym"}), headers={"Idempotency-Key": "first"})
    assert again.status_code == 201 and again.json()["id"] != job_id, again.text


def test_late_writes_never_recreate_a_deleted_job(client, settings: Settings, r, keys: store.Keys) -> None:
    """A worker still finishing (or frozen and thawed) writes progress, events, attempts and artifacts
    after the job was deleted: none of it may bring the job back."""
    job_id = _job(client, settings)
    client.post(f"/v1/jobs/{job_id}/cancel")
    lease = store.Lease(r, keys, job_id, 10.0)
    reporter = RedisReporter(r, keys, job_id, Monitor(r, keys, job_id, lease, 0.2, 60.0), interval_s=0.0)
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204

    reporter.event("stage_started", "distill started", stage="distill")
    reporter.event("epoch_end", "epoch 1 done", stage="distill", epoch=1)
    store.update_job(r, keys, job_id, stage="export")
    assert store.add_event(r, keys, job_id, "info", "late") is None
    assert store.start_attempt(r, keys, job_id) is None
    store.set_artifacts(r, keys, job_id, [{"name": "student.onnx", "size": 1, "sha256": "x"}])
    assert _job_keys(r, keys, job_id) == []
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404


def test_delete_dataset(client, settings: Settings, r, keys: store.Keys, small_zip: Path) -> None:
    up = client.post("/v1/datasets", files={"file": ("d.zip", small_zip.read_bytes(), "application/zip")})
    ds_id = up.json()["id"]
    folder = Path(settings.data_root) / "datasets" / ds_id
    assert folder.is_dir()
    spec = tiny_spec({"id": ds_id})
    job_id = client.post("/v1/jobs", json=spec).json()["id"]

    busy = client.delete(f"/v1/datasets/{ds_id}")
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["code"] == "dataset_in_use" and busy.json()["error"]["jobs"] == [job_id]
    assert client.delete(f"/v1/datasets/{ds_id}", headers=BOB).status_code == 404
    assert client.get(f"/v1/datasets/{ds_id}").status_code == 200 and folder.is_dir()

    client.post(f"/v1/jobs/{job_id}/cancel")
    assert client.delete(f"/v1/datasets/{ds_id}").status_code == 204
    assert client.get(f"/v1/datasets/{ds_id}").status_code == 404
    assert client.get("/v1/datasets").json()["data"] == []
    assert client.delete(f"/v1/datasets/{ds_id}").status_code == 404
    assert not folder.exists() and not r.exists(keys.dataset(ds_id))
    refused = client.post("/v1/jobs", json=spec)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "dataset_not_found"
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"  # finished jobs stay


def _succeeded_job(client, settings: Settings, r, keys: store.Keys) -> str:
    """A succeeded job with teacher and student weight files, as a finished run leaves them."""
    job_id = _job(client, settings)
    for status, before in ((store.RUNNING, store.QUEUED), (store.SUCCEEDED, store.RUNNING)):
        store.transition(r, keys, job_id, status, [before])
    out = storage.job_dir(settings, job_id)
    out.mkdir(parents=True)
    for role in ("teacher", "student"):
        (out / role).mkdir()
        (out / role / "model.safetensors").write_bytes(b"weights")
    store.set_artifacts(r, keys, job_id, [{"name": "teacher/model.safetensors", "size": 7, "sha256": "x"}])
    return job_id


def _job_on_weights(client, role: str, model: str, source: str) -> str:
    spec = tiny_spec({"path": "hym"}, **{role: {"model": model, "weights": f"job:{source}"}})
    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def test_delete_job_whose_weights_an_active_job_uses(client, settings: Settings, r, keys) -> None:
    """Like a dataset in use: a job whose `weights: job:<id>` a queued or running job names is a 409
    naming those jobs, and its files stay; once they ended it deletes."""
    source = _succeeded_job(client, settings, r, keys)
    by_teacher = _job_on_weights(client, "teacher", "test_efficientnet", source)
    by_student = _job_on_weights(client, "student", "test_resnet", source)
    other = _job(client, settings)  # active too, but names nothing of it

    busy = client.delete(f"/v1/jobs/{source}")
    assert busy.status_code == 409, busy.text
    err = busy.json()["error"]
    assert err["code"] == "job_in_use" and sorted(err["jobs"]) == sorted([by_teacher, by_student]), err
    assert other not in err["message"] and by_teacher in err["message"]
    assert client.get(f"/v1/jobs/{source}").status_code == 200
    assert (storage.job_dir(settings, source) / "teacher" / "model.safetensors").is_file()
    assert client.delete(f"/v1/jobs/{source}", headers=BOB).status_code == 404  # another key's: unknown

    client.post(f"/v1/jobs/{by_teacher}/cancel")
    still = client.delete(f"/v1/jobs/{source}")
    assert still.status_code == 409 and still.json()["error"]["jobs"] == [by_student], still.text
    client.post(f"/v1/jobs/{by_student}/cancel")
    assert client.delete(f"/v1/jobs/{source}").status_code == 204
    assert not storage.job_dir(settings, source).exists()
    assert client.get(f"/v1/jobs/{other}").json()["status"] == "queued"  # untouched throughout


def test_retention_keeps_a_job_whose_weights_are_in_use(client, settings: Settings, r, keys) -> None:
    source = _succeeded_job(client, settings, r, keys)
    user = _job_on_weights(client, "teacher", "test_efficientnet", source)
    time.sleep(0.05)
    tiny = settings.model_copy(update={"job_ttl_days": 0.01 / 86400})
    assert storage.apply_retention(r, keys, tiny) == []
    assert client.get(f"/v1/jobs/{source}").status_code == 200
    assert (storage.job_dir(settings, source) / "teacher" / "model.safetensors").is_file()
    client.post(f"/v1/jobs/{user}/cancel")
    time.sleep(0.05)
    assert sorted(storage.apply_retention(r, keys, tiny)) == sorted([source, user])


def test_delete_and_a_new_user_of_the_job_cannot_interleave(
    client, settings: Settings, r, keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check and the delete are one transaction over the owner's active-job indexes: a job
    queued between the check and the delete makes the delete retry and see it (store.delete_job
    with a job queued from inside its WATCH phase, the worst moment)."""
    source = _succeeded_job(client, settings, r, keys)
    owner = store.owner_of(KEY_A)
    spec = tiny_spec({"path": "hym"}, teacher={"model": "test_efficientnet", "weights": f"job:{source}"})
    queued: list[str] = []
    real_using = store_jobs.jobs_using_job

    def using_then_a_new_job_arrives(pipe, keys_, owner_, job_id):
        found = real_using(pipe, keys_, owner_, job_id)
        if not queued:  # a second client queues a user right after the check read the indexes
            queued.append(store.create_job(store.connect(settings.redis_url), keys, owner, spec)["id"])
        return found

    # delete_job looks the name up in its own module, core/store/jobs.py
    monkeypatch.setattr(store_jobs, "jobs_using_job", using_then_a_new_job_arrives)
    with pytest.raises(store.InUse) as e:
        store.delete_job(r, keys, source, owner)
    assert e.value.jobs == queued and client.get(f"/v1/jobs/{source}").status_code == 200


def test_resume_refusals(client, settings: Settings, r, keys: store.Keys) -> None:
    job_id = _job(client, settings)
    queued = client.post(f"/v1/jobs/{job_id}/resume")
    assert queued.status_code == 409 and queued.json()["error"]["status"] == "queued", queued.text
    client.post(f"/v1/jobs/{job_id}/cancel")
    no_ckpt = client.post(f"/v1/jobs/{job_id}/resume")
    assert no_ckpt.status_code == 409, no_ckpt.text
    assert no_ckpt.json()["error"] == {
        "code": "job_not_resumable",
        "message": no_ckpt.json()["error"]["message"],
        "field": None,
        "status": "cancelled",
    }
    assert "no checkpoint" in no_ckpt.json()["error"]["message"]
    assert client.post(f"/v1/jobs/{job_id}/resume", headers=BOB).status_code == 404

    # Where a service attempt keeps it (models/training/checkpoint.py: one folder per fencing token).
    ckpt = storage.job_dir(settings, job_id) / "checkpoints" / "attempt-00000003" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a checkpoint")
    resp = client.post(f"/v1/jobs/{job_id}/resume")
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["status"] == "queued" and not job["cancel_requested"] and job["finished_at"] is None
    assert client.get(f"/v1/jobs/{job_id}/events").json()["data"][-1]["message"].startswith("resumed")
    twice = client.post(f"/v1/jobs/{job_id}/resume")
    assert twice.status_code == 409 and twice.json()["error"]["status"] == "queued"


def test_retention(client, settings: Settings, r, keys: store.Keys, small_zip: Path) -> None:
    old_job, kept_job = _job(client, settings), _job(client, settings)
    client.post(f"/v1/jobs/{old_job}/cancel")  # finished; kept_job stays queued (active)
    storage.job_dir(settings, old_job).mkdir(parents=True)
    ds_id = client.post(
        "/v1/datasets", files={"file": ("d.zip", small_zip.read_bytes(), "application/zip")}
    ).json()["id"]
    # Unset: keep forever.
    assert storage.apply_retention(r, keys, settings) == []
    time.sleep(0.05)
    tiny = settings.model_copy(update={"job_ttl_days": 0.01 / 86400, "dataset_ttl_days": 0.01 / 86400})
    assert sorted(storage.apply_retention(r, keys, tiny)) == sorted([old_job, ds_id])
    assert client.get(f"/v1/jobs/{old_job}").status_code == 404
    assert not storage.job_dir(settings, old_job).exists()
    assert client.get(f"/v1/jobs/{kept_job}").json()["status"] == "queued"
    assert client.get(f"/v1/datasets/{ds_id}").status_code == 404
    assert not (Path(settings.data_root) / "datasets" / ds_id).exists()


def test_retention_keeps_a_dataset_in_use(client, settings: Settings, r, keys, small_zip: Path) -> None:
    ds_id = client.post(
        "/v1/datasets", files={"file": ("d.zip", small_zip.read_bytes(), "application/zip")}
    ).json()["id"]
    client.post("/v1/jobs", json=tiny_spec({"id": ds_id}))
    time.sleep(0.05)
    tiny = settings.model_copy(update={"dataset_ttl_days": 0.01 / 86400})
    assert storage.apply_retention(r, keys, tiny) == []
    assert client.get(f"/v1/datasets/{ds_id}").status_code == 200


def test_retention_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPKD_JOB_TTL_DAYS", "30")
    monkeypatch.setenv("SPKD_DATASET_TTL_DAYS", "7.5")
    s = Settings()
    assert (s.job_ttl_days, s.dataset_ttl_days) == (30.0, 7.5)
    monkeypatch.delenv("SPKD_JOB_TTL_DAYS")
    monkeypatch.delenv("SPKD_DATASET_TTL_DAYS")
    assert (Settings().job_ttl_days, Settings().dataset_ttl_days) == (None, None)


# ---------------------------------------------------------------- the sweep at start


def _old(path: Path, age_s: float = 3600) -> Path:
    t = time.time() - age_s
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (t, t), follow_symlinks=False)
    return path


def _tree(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _start_api(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        assert c.get("/healthz").status_code == 200


def test_api_start_sweeps_leftovers(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url, orphan_grace_s=600)
    r, keys = store.connect(redis_url), store.Keys(settings.redis_prefix)
    try:
        ds_root = Path(settings.data_root) / "datasets"
        art = Path(settings.artifact_root)
        stale = [
            _old(_tree(ds_root / ".upload-abc", {"upload.zip": b"z" * 1000})),
            _old(_tree(ds_root / ".extract-abc", {"train/a/x.jpg": b"j"})),
            _old(_tree(ds_root / store.new_id("ds"), {"a/x.jpg": b"j"})),  # no record: orphan
            _old(_tree(art / store.new_id("job"), {"student.onnx": b"o"})),  # no record: orphan
            _old(_tree(art / ".deleting-job_x-1234", {"f": b"f"})),
        ]
        fresh = [
            _tree(ds_root / ".upload-inflight", {"upload.zip": b"z"}),  # an upload in flight
            _tree(ds_root / store.new_id("ds"), {"a/x.jpg": b"j"}),  # between extraction and record
            _old(_tree(ds_root / ".extract-slow", {"train/a/old.jpg": b"j"})),
        ]
        _tree(fresh[-1], {"train/a/new.jpg": b"j"})  # still being written: its newest file decides
        recorded_ds = store.new_id("ds")
        store.save_dataset(r, keys, {"id": recorded_ds, "owner": "o", "created_at": 0})
        job = store.create_job(r, keys, "o", tiny_spec({"path": "hym"}))
        store.transition(r, keys, job["id"], store.FAILED, [store.QUEUED])
        files = {"checkpoints/last.pt": b"c", "checkpoints/.last.pt.x1": b"t", "student.onnx.tmp": b"t"}
        job_files = _old(_tree(art / job["id"], files))
        fresh += [_old(_tree(ds_root / recorded_ds, {"a/x.jpg": b"j"})), job_files / "checkpoints/last.pt"]

        _start_api(settings)
        assert [p for p in stale if p.exists()] == []
        assert [p for p in fresh if not p.exists()] == []
        assert sorted(p.name for p in job_files.rglob("*")) == ["checkpoints", "last.pt"]
    finally:
        store.delete_prefix(r, settings.redis_prefix)


def test_sweep_removes_attempt_folders_nothing_reads(tmp_path: Path, redis_url: str) -> None:
    """A stale attempt that thawed after the job ended leaves its folder (core/attempts.py): the
    sweep removes it once untouched for the grace period, and keeps the folder the record names
    and the newest one with a checkpoint (a failed job resumes from it)."""
    settings = make_settings(tmp_path, redis_url, orphan_grace_s=600)
    r, keys = store.connect(redis_url), store.Keys(settings.redis_prefix)
    art = Path(settings.artifact_root)
    try:
        done = store.create_job(r, keys, "o", tiny_spec({"path": "hym"}))["id"]
        store.transition(r, keys, done, store.SUCCEEDED, [store.QUEUED], output="attempt-00000004")
        failed = store.create_job(r, keys, "o", tiny_spec({"path": "hym"}))["id"]
        store.transition(r, keys, failed, store.FAILED, [store.QUEUED])
        current = _old(_tree(art / done / "attempt-00000004", {"student.onnx": b"o"}))
        stale = [
            _old(_tree(art / done / "attempt-00000003", {"tensorboard/distill/ev": b"late"})),
            _old(_tree(art / failed / "attempt-00000001", {"checkpoints/last.pt": b"c1"})),
            _old(_tree(art / failed / "attempt-00000003", {"tensorboard/x": b"no checkpoint"})),
        ]
        resume_from = _old(_tree(art / failed / "attempt-00000002", {"checkpoints/last.pt": b"c2"}))
        recent = _tree(art / done / "attempt-00000002", {"tensorboard/x": b"just written"})
        removed = storage.sweep(r, keys, settings)
        assert sorted(removed) == sorted(stale)
        assert current.exists() and resume_from.exists() and recent.exists()
    finally:
        store.delete_prefix(r, settings.redis_prefix)


def test_sweep_leaves_folders_of_another_store_alone(tmp_path: Path, redis_url: str) -> None:
    """A wiped Redis or another SPKD_REDIS_PREFIX: every folder looks unrecorded, none is removed."""
    first = make_settings(tmp_path, redis_url, orphan_grace_s=0)
    r = store.connect(redis_url)
    second = first.model_copy(update={"redis_prefix": first.redis_prefix + "-other"})
    try:
        storage.sweep(r, store.Keys(first.redis_prefix), first)  # the first store claims the folders
        ds = _old(_tree(Path(first.data_root) / "datasets" / store.new_id("ds"), {"a/x.jpg": b"j"}))
        job = _old(_tree(Path(first.artifact_root) / store.new_id("job"), {"metrics.json": b"{}"}))
        assert storage.sweep(r, store.Keys(second.redis_prefix), second) == []
        assert ds.exists() and job.exists()
        assert sorted(storage.sweep(r, store.Keys(first.redis_prefix), first)) == sorted([ds, job])
    finally:
        store.delete_prefix(r, first.redis_prefix)
        store.delete_prefix(r, second.redis_prefix)


def test_api_starts_and_sweeps_temporaries_with_redis_down(tmp_path: Path) -> None:
    """Redis unreachable at start: upload temporaries (no record needed) still go, unrecorded
    folders stay (no store to ask), and the API serves (503 for what needs the store)."""
    from spkd.cli import procs

    settings = make_settings(tmp_path, f"redis://127.0.0.1:{procs.free_port()}/0", orphan_grace_s=60)
    ds_root = Path(settings.data_root) / "datasets"
    stale = _old(_tree(ds_root / ".upload-abc", {"upload.zip": b"z"}))
    unrecorded = _old(_tree(ds_root / store.new_id("ds"), {"a/x.jpg": b"j"}))
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/jobs").status_code == 503
    assert not stale.exists() and unrecorded.exists()
