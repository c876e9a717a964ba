"""Object storage under faults: a job moves between two workers that share no disk (only Redis
and the bucket); the bucket goes away mid-job; the credentials are wrong. Real SeaweedFS, real
`spkd serve` / `spkd worker` processes, tiny timm models."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from spkd.core import store
from tests.helpers import (
    SeaweedS3,
    Stack,
    dump,
    epoch_ends,
    events,
    host_env,
    small_imagefolder,
    tiny_spec,
    upload_zip,
    wait_event,
    wait_final,
    zip_dir,
)

pytestmark = pytest.mark.slow
EPOCHS = 3
TRAIN = {"epochs": EPOCHS, "batch_size": 4, "image_size": 32, "num_workers": 0}


def _checkpoint(epoch: int):
    return lambda e: e["kind"] == "checkpoint" and e["data"].get("epoch") == epoch


def test_two_hosts_hand_a_job_over_through_the_bucket(
    stack_factory, redis_url: str, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    """w1 trains on host 1 and dies after epoch 1 (its checkpoint was published: the event says
    so); w2 on host 2, which never saw host 1's folders, fetches the dataset and that checkpoint
    from the bucket, resumes at epoch 2, and finishes."""
    prefix = f"handover-{uuid.uuid4().hex[:8]}"
    st: Stack = stack_factory(redis_url, max_attempts=4, **s3_server.settings(prefix))
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    host1, host2 = tmp_path / "host1", tmp_path / "host2"
    st.start_api()
    st.start_worker("w1", host_env(host1))
    st.wait_ready()
    c = st.client()
    ds_id = upload_zip(c, tmp_path)
    job_id = c.post("/v1/jobs", json=tiny_spec({"id": ds_id}, train=TRAIN)).json()["id"]
    first = wait_event(r, keys, job_id, _checkpoint(1), 240)
    assert first["data"]["published_s"] >= 0
    assert any(k.endswith("/last.pt") for k in s3_server.keys(f"{prefix}/jobs/{job_id}/checkpoints/"))
    st.kill_worker("w1")
    st.start_worker("w2", host_env(host2))
    job = wait_final(r, keys, job_id, 300)
    evs = events(r, keys, job_id)
    assert job["status"] == "succeeded", (dump(evs), st.logs())
    ends = epoch_ends(evs)
    resumed = [e for e in evs if "resuming from checkpoint" in e["message"]]
    assert resumed, dump(evs)
    # Every epoch ran once after the epoch-1 checkpoint: w2 started from it, not from scratch.
    assert ends.count(("distill", 1)) == 1 and ends[-2:] == [("distill", 2), ("distill", 3)], dump(evs)
    current = store.get_job(r, keys, job_id)["output"]  # the attempt folder that counts (core/attempts.py)
    assert (host2 / "cache" / ds_id).is_dir() and (
        host2 / "artifacts" / job_id / current / "student.onnx"
    ).is_file()
    assert not list((host1 / "artifacts" / job_id).glob("*/student.onnx"))
    assert "fetched from the bucket" in st.logs()
    names = {a["name"] for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    in_bucket = set(s3_server.keys(f"{prefix}/jobs/{job_id}/"))
    assert in_bucket == {f"{prefix}/jobs/{job_id}/{current}/artifacts/{n}" for n in names}


def test_bucket_lost_mid_job_fails_storage_unavailable_then_resumes(
    stack_factory, redis_url: str, tmp_path: Path
) -> None:
    """A private SeaweedFS stops after the first checkpoint: the next publish is retried
    (SPKD_S3_RETRIES, backoff), then the job fails with `storage_unavailable`, its local checkpoint
    intact. The server comes back; POST /resume finishes the job from that checkpoint."""
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    try:
        prefix = "lost"
        st: Stack = stack_factory(
            redis_url, s3_retries=3, s3_backoff_s=0.5, s3_timeout_s=3, **server.settings(prefix)
        )
        r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
        host = tmp_path / "host"
        st.start_api()
        st.start_worker("w1", host_env(host))
        st.wait_ready()
        c = st.client()
        ds_id = upload_zip(c, tmp_path)
        job_id = c.post("/v1/jobs", json=tiny_spec({"id": ds_id}, train=TRAIN)).json()["id"]
        wait_event(r, keys, job_id, _checkpoint(1), 240)
        server.stop()
        job = wait_final(r, keys, job_id, 240)
        evs = events(r, keys, job_id)
        assert job["status"] == "failed" and job["error"]["code"] == "storage_unavailable", dump(evs)
        assert "after 3 attempts" in job["error"]["message"]
        assert "retry 2/2" in st.logs()  # backoff between attempts, logged
        local = list((host / "artifacts" / job_id).glob("attempt-*/checkpoints/last.pt"))
        assert local and all(p.stat().st_size > 0 for p in local)
        server.start()  # the same data folder: the epoch-1 checkpoint is still published
        res = c.post(f"/v1/jobs/{job_id}/resume")
        assert res.status_code == 200, res.text
        job = wait_final(r, keys, job_id, 300)
        evs = events(r, keys, job_id)
        assert job["status"] == "succeeded", (dump(evs), st.logs())
        assert epoch_ends(evs).count(("distill", 1)) == 1, dump(evs)  # resumed, not redone
    finally:
        server.stop()


def test_wrong_credentials_never_leak(
    stack_factory, redis_url: str, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    """A wrong secret: the job fails `storage_unavailable` at its first checkpoint publish and an
    upload answers 503 `storage_unavailable`; the secret is in no event, error, response or log."""
    secret = "wrong-" + uuid.uuid4().hex
    over = {**s3_server.settings(f"creds-{uuid.uuid4().hex[:8]}"), "s3_secret_access_key": secret}
    st: Stack = stack_factory(redis_url, s3_retries=2, s3_backoff_s=0.2, **over)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=4)
    st.start_api()
    st.start_worker("w1")
    st.wait_ready()
    c = st.client()
    folder = small_imagefolder(tmp_path / "ds", per_class=2)
    res = c.post("/v1/datasets", content=zip_dir(folder, tmp_path / "ds.zip").read_bytes(),
                 headers={"Content-Type": "application/zip"})  # fmt: skip
    assert res.status_code == 503 and res.json()["error"]["code"] == "storage_unavailable", res.text
    assert "403" in res.json()["error"]["message"] and secret not in res.text
    job_id = c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]
    job = wait_final(r, keys, job_id, 240)
    evs = events(r, keys, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "storage_unavailable", dump(evs)
    seen = [c.get(f"/v1/jobs/{job_id}").text, c.get(f"/v1/jobs/{job_id}/events").text, st.logs(), dump(evs)]
    assert all(secret not in text for text in seen)
