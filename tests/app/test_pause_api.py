"""POST /v1/jobs/{id}/pause and its neighbours against the real Redis and the app in-process:
a queued job pauses at once, a validating or running one gets the flag the worker polls, the
refusals (finished, already paused, cancel pending) are 409s with a stable code and the job's
status, another key's job is a 404 like a missing one, resume and cancel of a paused job,
retention of paused jobs (their age counts from the pause), a paused job's dataset stays, and the
orphan sweep leaves paused jobs alone. The worker's side is tests/workers/test_pause.py."""

from __future__ import annotations

import time
from pathlib import Path

from spkd.core import storage, store
from spkd.core.settings import Settings
from tests.helpers import KEY_B, tiny_spec

BOB = {"Authorization": f"Bearer {KEY_B}"}


def _job(client, settings: Settings, dataset: dict | None = None) -> str:
    (Path(settings.data_root) / "hym").mkdir(exist_ok=True)
    resp = client.post("/v1/jobs", json=tiny_spec(dataset or {"path": "hym"}))
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _running(r, keys: store.Keys, job_id: str) -> None:
    """Where a worker would have taken it: validating, then running."""
    store.transition(r, keys, job_id, store.VALIDATING, [store.QUEUED])
    store.transition(r, keys, job_id, store.RUNNING, [store.VALIDATING])


def _error(resp) -> dict:
    assert resp.status_code == 409, resp.text
    return resp.json()["error"]


def test_pause_a_queued_job_resume_it_and_cancel_it(client, settings: Settings, r, keys) -> None:
    job_id = _job(client, settings)
    resp = client.post(f"/v1/jobs/{job_id}/pause")
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["status"] == "paused" and job["paused_at"] and not job["pause_requested"], job
    assert job["finished_at"] is None  # not finished: it can go on
    last = client.get(f"/v1/jobs/{job_id}/events").json()["data"][-1]
    assert last["kind"] == "status" and last["data"] == {"status": "paused", "steps_redone": 0}, last
    assert [j["id"] for j in client.get("/v1/jobs?status=paused").json()["data"]] == [job_id]
    assert client.get("/v1/jobs?status=queued").json()["data"] == []
    assert r.zscore(keys.status(store.PAUSED), job_id) is not None

    again = _error(client.post(f"/v1/jobs/{job_id}/pause"))
    assert again["code"] == "job_paused" and again["status"] == "paused", again

    # Resumed: queued again without a checkpoint (it never ran; starting over loses nothing).
    resp = client.post(f"/v1/jobs/{job_id}/resume")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "queued" and resp.json()["paused_at"] is None
    assert client.get(f"/v1/jobs/{job_id}/events").json()["data"][-1]["message"].startswith("resumed")

    # Paused again, then cancelled: it ends cancelled at once and cannot be paused any more.
    assert client.post(f"/v1/jobs/{job_id}/pause").json()["status"] == "paused"
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    assert resp.json()["finished_at"] and resp.json()["paused_at"] is None
    assert client.get(f"/v1/jobs/{job_id}/events").json()["data"][-1]["message"] == "cancelled while paused"
    assert r.zscore(keys.status(store.PAUSED), job_id) is None
    assert client.get("/v1/jobs?status=paused").json()["data"] == []
    final = _error(client.post(f"/v1/jobs/{job_id}/pause"))
    assert final["code"] == "job_finished" and final["status"] == "cancelled", final


def test_pause_is_owner_only(client, settings: Settings) -> None:
    """Another key's job answers pause and resume exactly like a job that does not exist."""
    job_id = _job(client, settings)
    missing = client.post("/v1/jobs/job_00000000000000000000/pause")
    assert missing.status_code == 404, missing.text
    for action in ("pause", "resume"):
        theirs = client.post(f"/v1/jobs/{job_id}/{action}", headers=BOB)
        assert theirs.status_code == 404, theirs.text
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
        assert theirs.json()["error"]["message"] == missing.json()["error"]["message"].replace(
            "job_00000000000000000000", job_id
        )
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # untouched
    client.post(f"/v1/jobs/{job_id}/pause")
    assert client.post(f"/v1/jobs/{job_id}/resume", headers=BOB).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=BOB).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "paused"


def test_pause_of_a_finished_job_is_409(client, settings: Settings, r, keys) -> None:
    for final in (store.SUCCEEDED, store.FAILED):
        job_id = _job(client, settings)
        _running(r, keys, job_id)
        store.transition(r, keys, job_id, final, [store.RUNNING])
        err = _error(client.post(f"/v1/jobs/{job_id}/pause"))
        assert err["code"] == "job_finished" and err["status"] == final, err
        assert final in err["message"]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == final


def test_pause_of_a_running_job_raises_the_flag(client, settings: Settings, r, keys) -> None:
    job_id = _job(client, settings)
    _running(r, keys, job_id)
    resp = client.post(f"/v1/jobs/{job_id}/pause")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "running" and resp.json()["pause_requested"] is True
    assert store.stop_flags(r, keys, job_id) == (False, True)
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert events[-1]["kind"] == "pause_requested", events[-1]
    # Asked again while the flag is up: the same answer, no second event.
    again = client.post(f"/v1/jobs/{job_id}/pause")
    assert again.status_code == 200 and again.json()["pause_requested"] is True
    assert len(client.get(f"/v1/jobs/{job_id}/events").json()["data"]) == len(events)

    # The worker stops: paused (fenced like every runner write), the flag is cleared.
    lease = store.Lease(r, keys, job_id, 10)
    assert lease.acquire()
    store.transition(r, keys, job_id, store.PAUSED, [store.RUNNING], fence=lease.fence)
    lease.release()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "paused" and job["pause_requested"] is False and job["paused_at"], job


def test_cancel_wins_over_pause(client, settings: Settings, r, keys) -> None:
    """A cancel after a pause request ends the job cancelled (the move to paused is refused); a
    pause after a cancel request is a 409 `cancel_pending`."""
    job_id = _job(client, settings)
    _running(r, keys, job_id)
    assert client.post(f"/v1/jobs/{job_id}/pause").json()["pause_requested"] is True
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    try:
        store.transition(r, keys, job_id, store.PAUSED, [store.RUNNING])
        raise AssertionError("a job with a cancel request must not pause")
    except store.CancelPending:
        pass
    err = _error(client.post(f"/v1/jobs/{job_id}/pause"))
    assert err["code"] == "cancel_pending" and err["status"] == "running", err
    store.transition(r, keys, job_id, store.CANCELLED, [store.RUNNING])
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_resume_of_a_paused_job_waits_for_its_run_to_let_go(client, settings: Settings, r, keys) -> None:
    """Paused, but its process still holds the lease (between the paused write and the release):
    a resume now would queue a message the busy lease makes a worker drop, so it is a 409."""
    job_id = _job(client, settings)
    _running(r, keys, job_id)
    lease = store.Lease(r, keys, job_id, 10)
    assert lease.acquire()
    client.post(f"/v1/jobs/{job_id}/pause")
    store.transition(r, keys, job_id, store.PAUSED, [store.RUNNING], fence=lease.fence)
    err = _error(client.post(f"/v1/jobs/{job_id}/resume"))
    assert err["code"] == "job_not_resumable" and err["status"] == "paused"
    assert "shutting down" in err["message"], err
    lease.release()
    resp = client.post(f"/v1/jobs/{job_id}/resume")
    assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text


def test_a_paused_job_is_not_an_orphan(client, settings: Settings, r, keys) -> None:
    """No lease and not finished, like a job whose worker died; the sweep must leave it paused."""
    job_id = _job(client, settings)
    _running(r, keys, job_id)
    client.post(f"/v1/jobs/{job_id}/pause")
    store.transition(r, keys, job_id, store.PAUSED, [store.RUNNING])
    assert not store.lease_held(r, keys, job_id)
    assert not store.claim_orphan(r, keys, job_id, 0, "its worker was lost; queued again to resume")
    assert store.get_job(r, keys, job_id)["status"] == "paused"
    assert "worker was lost" not in client.get(f"/v1/jobs/{job_id}/events").text
    # The same job running without a lease is one (the check above is not vacuous).
    other = _job(client, settings)
    _running(r, keys, other)
    assert store.claim_orphan(r, keys, other, 0, "its worker was lost; queued again to resume")


def test_retention_counts_a_paused_job_from_when_it_paused(client, settings: Settings, r, keys) -> None:
    old, recent, active = _job(client, settings), _job(client, settings), _job(client, settings)
    for job_id in (old, recent):
        client.post(f"/v1/jobs/{job_id}/pause")
        storage.job_dir(settings, job_id).mkdir(parents=True)
    job = store.get_job(r, keys, recent)
    assert r.zscore(keys.status(store.PAUSED), recent) == job["paused_at"]  # the index retention reads
    day = 86400
    # All three were created 30 days ago; `old` paused 3 days ago, `recent` just now.
    for job_id in (old, recent, active):
        r.hset(keys.job(job_id), "created_at", str(time.time() - 30 * day))
    r.zadd(keys.status(store.PAUSED), {old: time.time() - 3 * day})
    week = settings.model_copy(update={"job_ttl_days": 7})
    assert storage.apply_retention(r, keys, week) == []  # paused less than a week ago: kept
    two_days = settings.model_copy(update={"job_ttl_days": 2})
    assert storage.apply_retention(r, keys, two_days) == [old]
    assert client.get(f"/v1/jobs/{old}").status_code == 404 and not storage.job_dir(settings, old).exists()
    assert client.get(f"/v1/jobs/{recent}").json()["status"] == "paused"
    assert storage.job_dir(settings, recent).is_dir()
    assert client.get(f"/v1/jobs/{active}").json()["status"] == "queued"


def test_a_paused_job_keeps_its_dataset(client, settings: Settings, small_zip: Path) -> None:
    """Its resume needs the data: the dataset cannot be deleted under it (cancel it first)."""
    up = client.post("/v1/datasets", files={"file": ("d.zip", small_zip.read_bytes(), "application/zip")})
    ds_id = up.json()["id"]
    job_id = _job(client, settings, {"id": ds_id})
    assert client.post(f"/v1/jobs/{job_id}/pause").json()["status"] == "paused"
    busy = client.delete(f"/v1/datasets/{ds_id}")
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["code"] == "dataset_in_use" and busy.json()["error"]["jobs"] == [job_id]
    assert "paused" in busy.json()["error"]["message"]
    client.post(f"/v1/jobs/{job_id}/cancel")
    assert client.delete(f"/v1/datasets/{ds_id}").status_code == 204


def test_a_paused_job_can_be_deleted(client, settings: Settings) -> None:
    job_id = _job(client, settings)
    client.post(f"/v1/jobs/{job_id}/pause")
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
