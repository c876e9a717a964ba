"""The worker's sweeper with real processes: at start it removes leftovers
of killed processes, and its periodic pass applies SPKD_JOB_TTL_DAYS to a job that ran; the CLI
deletes and resumes through the real API."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from spkd.core import store
from tests.helpers import KEY_A, SPKD, Stack, output_dir, small_imagefolder, tiny_spec, wait_final


def _old(path: Path, files: dict[str, bytes], age_s: float = 3600) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    t = time.time() - age_s
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))
    return path


def _wait_gone(paths: list[Path], timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.exists() for p in paths):
        time.sleep(0.2)
    return [p for p in paths if p.exists()]


def test_worker_sweeps_at_start_and_applies_retention(stack_factory, redis_url: str) -> None:
    ttl_s = 3.0
    st: Stack = stack_factory(redis_url, orphan_grace_s=600, sweep_interval_s=1.0, job_ttl_days=ttl_s / 86400)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=4)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    art, ds_root = Path(st.settings.artifact_root), Path(st.settings.data_root) / "datasets"
    # Leftovers of processes killed before this start (the API is not started: the worker alone).
    orphan_job = _old(art / store.new_id("job"), {"student.onnx": b"o" * 100})
    orphan_ds = _old(ds_root / store.new_id("ds"), {"a/x.jpg": b"j"})
    upload_tmp = _old(ds_root / ".upload-killed", {"upload.zip": b"z"})
    in_flight = ds_root / ".upload-now"
    in_flight.mkdir(parents=True)
    st.start_worker("w1")
    assert _wait_gone([orphan_job, orphan_ds, upload_tmp], 120) == [], st.logs()
    assert in_flight.exists()

    st.start_api()
    st.wait_ready()
    with st.client() as c:
        job_id = c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]
        job = wait_final(r, keys, job_id, 300)
        assert job["status"] == "succeeded"
        assert (output_dir(st.settings, job) / "student" / "model.safetensors").is_file()  # attempt folder
        # Finished ttl_s ago -> the next pass of the worker's sweeper deletes records and files.
        assert _wait_gone([art / job_id], 120) == [], st.logs()
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert store.list_events(r, keys, job_id) == []


def test_cli_delete_and_resume(stack_factory, redis_url: str, tmp_path: Path) -> None:
    st: Stack = stack_factory(redis_url)
    (Path(st.settings.data_root) / "hym").mkdir()
    st.start_api()
    st.wait_api()
    env = dict(os.environ, SPKD_URL=st.url, SPKD_API_KEY=KEY_A)

    def spkd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SPKD, *args], env=env, capture_output=True, text=True, timeout=60)

    with st.client() as c:
        job_id = c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]
        busy = spkd("delete", job_id)
        assert busy.returncode == 1 and "409 job_active" in busy.stderr, busy.stderr
        c.post(f"/v1/jobs/{job_id}/cancel")
        no_ckpt = spkd("resume", job_id)
        assert no_ckpt.returncode == 1 and "409 job_not_resumable" in no_ckpt.stderr, no_ckpt.stderr
        done = spkd("delete", job_id)
        assert done.returncode == 0, done.stderr
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        missing = spkd("datasets", "delete", "ds_nope")
        assert missing.returncode == 3 and "404 dataset_not_found" in missing.stderr, missing.stderr
