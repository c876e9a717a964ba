"""Large uploads are validated in the background (app/validation.py): 202 + `validating`, then
`ready` or `failed`; jobs on a dataset that is not ready are refused; a restart resumes or fails
what a dead API process left `validating`. The threshold is set tiny so small zips take that path."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from spkd.app import validation
from spkd.core import store
from spkd.core.settings import Settings
from tests.helpers import KEY_A, REDIS_URL, SPKD, Stack, make_stack, small_imagefolder, tiny_spec, zip_dir


def wait_settled(c: httpx.Client, ds_id: str, timeout: float = 60) -> dict:
    """Poll GET /v1/datasets/{id} until it is no longer `validating`."""
    deadline = time.monotonic() + timeout
    while True:
        ds = c.get(f"/v1/datasets/{ds_id}").json()
        if ds["status"] != "validating" or time.monotonic() > deadline:
            return ds
        time.sleep(0.2)


def upload(c: httpx.Client, data: bytes, name: str = "big") -> httpx.Response:
    return c.post("/v1/datasets", files={"file": ("d.zip", data, "application/zip")}, data={"name": name})


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A real `spkd serve` (no worker needed: jobs are only submitted) with a 1 KiB threshold."""
    s = make_stack(tmp_path, REDIS_URL, upload_sync_max_bytes=1024)
    s.start_api()
    try:
        s.wait_api()
        yield s
    finally:
        s.stop()
        store.delete_prefix(store.connect(REDIS_URL), s.settings.redis_prefix)


@pytest.fixture
def zipped(tmp_path: Path) -> bytes:
    return zip_dir(small_imagefolder(tmp_path / "hym", per_class=3), tmp_path / "d.zip", "hym/").read_bytes()


def test_large_upload_answers_202_then_ready(stack: Stack, zipped: bytes) -> None:
    with stack.client() as c:
        resp = upload(c, zipped)
        assert resp.status_code == 202, resp.text
        ds = resp.json()
        assert ds["status"] == "validating" and ds["classes"] == [] and ds["layout"] is None
        assert resp.headers["location"] == f"/v1/datasets/{ds['id']}"
        done = wait_settled(c, ds["id"])
        assert done["status"] == "ready", done
        assert done["classes"] == ["ants", "bees"] and done["layout"] == "split"
        assert done["counts"] == {"train": {"ants": 3, "bees": 3}, "val": {"ants": 3, "bees": 3}}
        assert done["name"] == "big" and done["created_at"] == ds["created_at"]
        # The stored zip is gone once validated; the extracted folder is the dataset.
        uploads = Path(stack.settings.data_root) / "datasets"
        assert not validation.pending_zip(stack.settings, ds["id"]).exists()
        assert (uploads / ds["id"] / "hym" / "train" / "ants").is_dir()


def test_corrupt_large_zip_ends_failed(stack: Stack, zipped: bytes) -> None:
    with stack.client() as c:
        resp = upload(c, b"PK\x03\x04" + b"\x00" * 4096)
        assert resp.status_code == 202, resp.text
        done = wait_settled(c, resp.json()["id"])
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "invalid_archive" and "zip" in done["error"]["message"]
        # A job on it: 422 with the reason.
        job = c.post("/v1/jobs", json=tiny_spec({"id": done["id"]}))
        assert job.status_code == 422, job.text
        err = job.json()["error"]
        assert err["code"] == "dataset_failed" and err["field"] == "dataset.id"
        assert "invalid_archive" in err["message"]


def plant(settings: Settings, ds_id: str, zip_bytes: bytes | None, lease: bool) -> None:
    """The state an API process leaves when it dies mid-validation (record `validating`, in the
    validating set, its zip stored), with its lease still live or already expired."""
    r, keys = store.connect(settings.redis_url), store.Keys(settings.redis_prefix)
    v = validation.Validator(r, keys, settings)
    rec = validation.validating_record(
        ds_id, store.owner_of(KEY_A), "left", len(zip_bytes or b""), time.time()
    )
    if zip_bytes is not None:
        validation.pending_zip(settings, ds_id).write_bytes(zip_bytes)
    store.save_dataset(r, keys, rec)
    r.sadd(v.validating_set(), ds_id)
    if lease:
        r.set(v.lease_key(ds_id), "1", px=60_000)


def test_job_on_validating_dataset_is_refused_409(stack: Stack, zipped: bytes) -> None:
    plant(stack.settings, "ds_busy0000000000000000", zipped, lease=True)  # another process is on it
    with stack.client() as c:
        assert c.get("/v1/datasets/ds_busy0000000000000000").json()["status"] == "validating"
        job = c.post("/v1/jobs", json=tiny_spec({"id": "ds_busy0000000000000000"}))
        assert job.status_code == 409, job.text
        err = job.json()["error"]
        assert err["code"] == "dataset_not_ready" and err["field"] == "dataset.id"


def test_restart_resumes_or_fails_what_a_dead_api_left(stack: Stack, zipped: bytes) -> None:
    stack.kill_api()  # SIGKILL: no cleanup
    plant(stack.settings, "ds_resume000000000000000", zipped, lease=False)
    plant(stack.settings, "ds_nozip0000000000000000", None, lease=False)
    orphan = validation.pending_zip(stack.settings, "ds_orphan000000000000000")  # zip, no record
    orphan.write_bytes(zipped)
    os.utime(orphan, (0, 0))
    stack.start_api()
    stack.wait_api()
    with stack.client() as c:
        resumed = wait_settled(c, "ds_resume000000000000000")
        assert resumed["status"] == "ready" and resumed["classes"] == ["ants", "bees"], resumed
        lost = wait_settled(c, "ds_nozip0000000000000000")
        assert lost["status"] == "failed" and lost["error"]["code"] == "validation_interrupted", lost
    assert not orphan.exists()
    r = store.connect(REDIS_URL)
    assert not r.smembers(f"{stack.settings.redis_prefix}:dsvalidating")
    assert (
        json.loads(r.get(f"{stack.settings.redis_prefix}:dataset:ds_resume000000000000000"))["status"]
        == "ready"
    )


def test_small_upload_stays_synchronous_and_ready(client, zipped: bytes) -> None:
    resp = upload(client, zipped, "small")
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "ready" and resp.json()["error"] is None


def test_cli_upload_waits_for_ready_and_prints_the_failure(stack: Stack, tmp_path: Path) -> None:
    folder = small_imagefolder(tmp_path / "cli", per_class=2)
    base = [SPKD, "datasets", "upload", "--url", stack.url, "--key", KEY_A, "--wait", "60"]
    ok = subprocess.run([*base, str(folder)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ds_id = ok.stdout.strip().splitlines()[-1]
    with stack.client() as c:
        assert c.get(f"/v1/datasets/{ds_id}").json()["status"] == "ready"  # it waited
    assert "['ants', 'bees']" in ok.stderr  # the summary goes to stderr, the id alone to stdout
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 4096)
    out = subprocess.run([*base, str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "failed validation: invalid_archive" in out.stdout + out.stderr


def test_delete_while_validating_removes_the_zip_and_stays_deleted(stack: Stack, zipped: bytes) -> None:
    ds_id = "ds_del00000000000000000"
    plant(stack.settings, ds_id, zipped, lease=False)  # the stack's sweeper claims it within ttl/3
    with stack.client() as c:
        assert c.delete(f"/v1/datasets/{ds_id}").status_code == 204
        assert not validation.pending_zip(stack.settings, ds_id).exists()
        r = store.connect(REDIS_URL)
        deadline = time.monotonic() + 60  # until the validating set has forgotten it
        while (
            r.sismember(f"{stack.settings.redis_prefix}:dsvalidating", ds_id) and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert not r.sismember(f"{stack.settings.redis_prefix}:dsvalidating", ds_id)
        assert c.get(f"/v1/datasets/{ds_id}").status_code == 404  # not brought back by the validation
        assert not (Path(stack.settings.data_root) / "datasets" / ds_id).exists()
