"""The service on object storage (SPKD_STORAGE_URL=s3://...): a real API and a real worker that
share only Redis and a real S3 server (SeaweedFS): different data and artifact folders, as on two
hosts. Upload -> the dataset lands in the bucket, not on the API's disk -> the worker fetches it
into its cache and trains -> the artifacts are in the bucket with their sha256 -> a download is a
307 to a presigned URL (or streamed) -> deleting the job and the dataset removes their objects."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from spkd.core import store
from tests.helpers import (
    KEY_A,
    SPKD,
    SeaweedS3,
    Stack,
    host_env,
    make_stack,
    small_imagefolder,
    tiny_spec,
    upload_zip,
    wait_job_over_http,
    zip_dir,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_stack(tmp_path: Path, redis_url: str, s3_server: SeaweedS3) -> Iterator[tuple[Stack, str]]:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    st = make_stack(tmp_path / "api", redis_url, **s3_server.settings(prefix))
    yield st, prefix
    st.stop()
    store.delete_prefix(store.connect(redis_url), st.settings.redis_prefix)


def test_upload_train_download_delete_through_the_bucket(
    s3_stack: tuple[Stack, str], s3_server: SeaweedS3, tmp_path: Path
) -> None:
    st, prefix = s3_stack
    worker_host = tmp_path / "worker-host"
    st.start_api()
    st.start_worker("w1", host_env(worker_host))
    st.wait_ready()
    c = st.client()
    ds_id = upload_zip(c, tmp_path)
    # In the bucket (manifest last), not on the API's disk.
    assert f"{prefix}/datasets/{ds_id}/.spkd-manifest.json" in s3_server.keys(f"{prefix}/datasets/{ds_id}/")
    assert not (Path(st.settings.data_root) / "datasets" / ds_id).exists()

    res = c.post("/v1/jobs", json=tiny_spec({"id": ds_id}))
    assert res.status_code == 201, res.text
    job_id = res.json()["id"]
    job = wait_job_over_http(c, job_id, 300, st.logs)
    assert job["status"] == "succeeded", (job, st.logs())
    assert (worker_host / "cache" / ds_id / "train" / "ants").is_dir()  # fetched once into its cache
    assert not (Path(st.settings.artifact_root) / job_id).exists()  # nothing on the API's disk

    arts = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    names = {a["name"] for a in arts}
    assert {"student/model.safetensors", "metrics.json", "student.onnx"} <= names
    in_bucket = set(s3_server.keys(f"{prefix}/jobs/{job_id}/"))
    # Under the attempt's own prefix (core/attempts.py); checkpoints dropped after success.
    [attempt] = {k.removeprefix(f"{prefix}/jobs/{job_id}/").split("/")[0] for k in in_bucket}
    assert attempt.startswith("attempt-"), in_bucket
    assert in_bucket == {f"{prefix}/jobs/{job_id}/{attempt}/artifacts/{n}" for n in names}
    for a in arts:
        res = c.get(f"/v1/jobs/{job_id}/artifacts/{a['name']}")
        assert res.status_code == 307 and res.headers["x-checksum-sha256"] == a["sha256"]
        body = httpx.get(res.headers["location"]).content  # the presigned URL, no API key
        assert len(body) == a["size"] and hashlib.sha256(body).hexdigest() == a["sha256"]
    head = s3_server.client().head_object(
        Bucket=s3_server.BUCKET, Key=f"{prefix}/jobs/{job_id}/{attempt}/artifacts/student.onnx"
    )
    assert head["Metadata"]["sha256"] == next(a["sha256"] for a in arts if a["name"] == "student.onnx")
    # The CLI follows the redirect (without sending its API key to the bucket) and checks the sha256.
    cli = subprocess.run(
        [SPKD, "download", job_id, "student.onnx", "--out", str(tmp_path / "dl"),
         "--url", st.url, "--key", KEY_A],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert cli.returncode == 0 and "sha256 ok" in cli.stdout + cli.stderr, cli.stdout + cli.stderr
    assert (tmp_path / "dl" / job_id / "student.onnx").stat().st_size > 0
    zipped = c.get(f"/v1/jobs/{job_id}/artifacts/student?format=zip")
    assert zipped.status_code == 200 and zipped.content[:2] == b"PK"

    # `weights: job:<id>` on a host that never had that job's files: fetched from the bucket.
    shutil.rmtree(worker_host / "artifacts" / job_id)
    student = {"model": "test_resnet", "weights": f"job:{job_id}"}
    res = c.post("/v1/jobs", json=tiny_spec({"id": ds_id}, student=student))
    assert res.status_code == 201, res.text
    second = wait_job_over_http(c, res.json()["id"], 300, st.logs)
    assert second["status"] == "succeeded", (second, st.logs())
    # fetched from the bucket into the attempt folder the first job's record names
    # with the config.json that names its classes (the reused-head check reads it)
    fetched = worker_host / "artifacts" / job_id / attempt / "student"
    assert (fetched / "model.safetensors").is_file() and (fetched / "config.json").is_file()
    assert c.delete(f"/v1/jobs/{second['id']}").status_code == 204

    assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert s3_server.keys(f"{prefix}/jobs/{job_id}/") == []
    assert c.delete(f"/v1/datasets/{ds_id}").status_code == 204
    assert s3_server.keys(f"{prefix}/datasets/{ds_id}/") == []


def test_stream_mode_sends_the_bytes_itself(tmp_path: Path, redis_url: str, s3_server: SeaweedS3) -> None:
    """SPKD_S3_DOWNLOAD=stream: the API answers 200 with the object (clients that cannot reach
    the bucket). The artifact is put in the bucket and registered as a worker would."""
    from spkd.app.auth import owner_of
    from spkd.core import blobs, bucket

    prefix = f"stream-{uuid.uuid4().hex[:8]}"
    st = make_stack(tmp_path, redis_url, **s3_server.settings(prefix), s3_download="stream")
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    try:
        st.start_api()
        st.wait_api()
        job = store.create_job(r, keys, owner_of(KEY_A), tiny_spec({"path": "x"}))
        f = tmp_path / "w.bin"
        f.write_bytes(b"weights" * 1000)
        digest = blobs.remote(st.settings).put_file(bucket.artifact_key(job["id"], "w.bin"), f)
        store.set_artifacts(r, keys, job["id"], [{"name": "w.bin", "size": 7000, "sha256": digest}])
        res = st.client().get(f"/v1/jobs/{job['id']}/artifacts/w.bin")
        assert res.status_code == 200 and res.content == f.read_bytes(), res.text
        assert res.headers["x-checksum-sha256"] == digest
    finally:
        st.stop()
        store.delete_prefix(r, st.settings.redis_prefix)


def test_background_upload_to_an_unusable_bucket_fails_storage_unavailable(
    tmp_path: Path, redis_url: str, s3_server: SeaweedS3
) -> None:
    """A large upload (validated in the background) that the bucket refuses (a wrong secret):
    the dataset ends `failed` with `storage_unavailable`, nothing kept, no secret in the record."""
    from fastapi.testclient import TestClient

    from spkd.app.main import create_app
    from tests.helpers import make_settings

    secret = "wrong-" + uuid.uuid4().hex
    over = {**s3_server.settings("bg"), "s3_secret_access_key": secret}
    s = make_settings(tmp_path, redis_url, **over, s3_retries=1, upload_sync_max_bytes=0)
    folder = small_imagefolder(tmp_path / "ds", per_class=2)
    try:
        with TestClient(create_app(s)) as c:
            c.headers["Authorization"] = f"Bearer {KEY_A}"
            res = c.post("/v1/datasets", content=zip_dir(folder, tmp_path / "ds.zip").read_bytes(),
                         headers={"Content-Type": "application/zip"})  # fmt: skip
            assert res.status_code == 202, res.text
            ds_id = res.json()["id"]
            for _ in range(200):
                ds = c.get(f"/v1/datasets/{ds_id}").json()
                if ds["status"] != "validating":
                    break
                time.sleep(0.1)
            assert ds["status"] == "failed" and ds["error"]["code"] == "storage_unavailable", ds
            assert secret not in str(ds)
            assert not (Path(s.data_root) / "datasets" / ds_id).exists()
    finally:
        store.delete_prefix(store.connect(redis_url), s.redis_prefix)
