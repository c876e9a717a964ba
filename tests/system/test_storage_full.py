"""A full disk is named and leaves nothing behind, on real file systems: a tmpfs
of a few MB mounted for the test and filled to the last byte, so every write gets a real ENOSPC.

- every write path of a job (checkpoint, weights, JSON, ONNX, report) raises OSError ENOSPC and
  leaves no file or temporary;
- an upload into a full data root is a 507 `storage_full`, with nothing left under datasets/;
- a job whose artifact root fills up fails `storage_full` naming its stage, leaves no temporary,
  and once space is freed `POST /v1/jobs/{id}/resume` finishes it from its checkpoint;
- an upload whose dataset record cannot be written (Redis killed after extraction) leaves no folder.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from spkd.core import store
from spkd.models.results import export, report
from spkd.models.training import checkpoint
from tests.helpers import (
    PrivateRedis,
    Stack,
    dump,
    events,
    output_dir,
    small_imagefolder,
    tiny_spec,
    wait_event,
    wait_final,
    zip_dir,
)


def fill(folder: Path) -> Path:
    """Fill the file system under `folder` to the last byte with one filler file."""
    filler = folder / "filler.bin"
    with filler.open("ab", buffering=0) as f:
        for size in (1 << 20, 1 << 14, 1 << 10, 1 << 6, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ---------------------------------------------------------------- the engine's write paths


def _write_paths(out: Path) -> dict:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 2))
    return {
        "checkpoint": lambda: checkpoint.save(out, {"w": torch.zeros(300_000)}),
        "weights": lambda: export.save_weights(model, out / "student.safetensors"),
        "json": lambda: export.write_json(out / "metrics.json", {"x": "y" * 100_000}),
        "onnx": lambda: export.export_onnx(model, 32, out / "student.onnx"),
        "report": lambda: report.write_report(out),
    }


@pytest.mark.parametrize("path", ["checkpoint", "weights", "json", "onnx", "report"])
def test_every_write_path_fails_clean_on_a_full_disk(small_fs, path: str) -> None:
    out = small_fs("art", 2 << 20)
    # What write_report reads.
    curves = {
        "distill": [
            {"epoch": 1, "train_loss": 1.0, "selection_loss": 1.0, "train_acc": 0.5, "selection_acc": 0.5}
        ]
    }
    (out / "metrics.json").write_text(json.dumps({"curves": curves}))
    (out / "checkpoints").mkdir()
    fill(out)
    before = listing(out)
    with pytest.raises(OSError) as info:
        _write_paths(out)[path]()
    assert info.value.errno == errno.ENOSPC, repr(info.value)
    assert listing(out) == before, "a failed write left files behind"


# ---------------------------------------------------------------- uploads


def _upload(c: httpx.Client, zip_path: Path, multipart: bool) -> httpx.Response:
    if multipart:
        files = {"file": ("d.zip", zip_path.read_bytes(), "application/zip")}
        return c.post("/v1/datasets", files=files, data={"name": "d"})
    return c.post("/v1/datasets", content=zip_path.read_bytes(), headers={"Content-Type": "application/zip"})


@pytest.mark.parametrize(
    ("multipart", "room"),
    [(True, 0), (False, 0), (True, "zip"), (False, "zip")],
    ids=["multipart-stream", "raw-stream", "multipart-extract", "raw-extract"],
)
def test_upload_into_full_data_root_is_507(
    small_fs, stack_factory, redis_url: str, tmp_path: Path, multipart: bool, room: object
) -> None:
    data = small_fs("data", 4 << 20)
    zip_path = zip_dir(small_imagefolder(tmp_path / "hym", per_class=4), tmp_path / "d.zip")
    st: Stack = stack_factory(redis_url, data_root=data)
    st.start_api()
    st.wait_api()
    (data / "datasets").mkdir(exist_ok=True)
    filler = fill(data)
    if room == "zip":  # room for the upload itself, not for its extraction as well
        with filler.open("r+b") as f:
            f.truncate(filler.stat().st_size - zip_path.stat().st_size - (64 << 10))
    with st.client() as c:
        resp = _upload(c, zip_path, multipart)
        assert resp.status_code == 507, resp.text
        err = resp.json()["error"]
        assert err["code"] == "storage_full" and "SPKD_DATA_ROOT" in err["message"], err
        assert c.get("/v1/datasets").json()["data"] == []
    assert listing(data / "datasets") == [], "the failed upload left files behind"


def test_background_validation_into_full_data_root_fails_storage_full(
    small_fs, stack_factory, redis_url: str, tmp_path: Path
) -> None:
    """A large upload (202) whose extraction fills the disk ends `failed` with `storage_full`,
    and leaves neither its zip nor a partial folder."""
    data = small_fs("data", 4 << 20)
    zip_path = zip_dir(small_imagefolder(tmp_path / "hym", per_class=4), tmp_path / "d.zip")
    st: Stack = stack_factory(redis_url, data_root=data, upload_sync_max_bytes=1024)
    st.start_api()
    st.wait_api()
    (data / "datasets").mkdir(exist_ok=True)
    filler = fill(data)
    with filler.open("r+b") as f:  # room for the zip, not for its extraction as well
        f.truncate(filler.stat().st_size - zip_path.stat().st_size - (64 << 10))
    with st.client() as c:
        resp = _upload(c, zip_path, True)
        assert resp.status_code == 202, resp.text
        ds = resp.json()
        while ds["status"] == "validating":  # the test's timeout bounds this
            ds = c.get(f"/v1/datasets/{ds['id']}").json()
        assert ds["status"] == "failed" and ds["error"]["code"] == "storage_full", ds
        assert "SPKD_DATA_ROOT" in ds["error"]["message"]
    assert [p for p in listing(data / "datasets") if not p.startswith(".spkd")] == [], "files left behind"


def test_upload_whose_record_cannot_be_written_leaves_no_folder(
    private_redis: PrivateRedis, stack_factory, tmp_path: Path
) -> None:
    """Redis dies after the zip arrived and was extracted: 503, and no invisible dataset folder."""
    folder = small_imagefolder(tmp_path / "hym", per_class=4)
    # A large first member: the client's send blocks until the route reads the body, i.e. after
    # the key was checked against Redis; Redis is killed before the rest is sent.
    (folder / "train" / "ants" / "padding.bin").write_bytes(os.urandom(12 << 20))
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as zf:
        zf.write(folder / "train" / "ants" / "padding.bin", "train/ants/padding.bin")
        for p in sorted(folder.rglob("*.jpg")):
            zf.write(p, p.relative_to(folder).as_posix())
    raw = body.getvalue()
    st: Stack = stack_factory(private_redis.url)
    st.start_api()
    st.wait_api()

    def stream() -> Iterator[bytes]:
        head = 10 << 20
        for i in range(0, head, 1 << 20):
            yield raw[i : i + (1 << 20)]
        private_redis.kill()
        yield raw[head:]

    with st.client() as c:
        resp = c.post("/v1/datasets", content=stream(), headers={"Content-Type": "application/zip"})
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "store_unavailable"
    datasets_dir = Path(st.settings.data_root) / "datasets"
    assert listing(datasets_dir) == [], "an extracted dataset without a record was left behind"


# ---------------------------------------------------------------- a job, then its resume


def test_job_fails_storage_full_then_resumes(small_fs, stack_factory, redis_url: str) -> None:
    art = small_fs("artifacts", 64 << 20)
    st: Stack = stack_factory(redis_url, artifact_root=art)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=6)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    st.start_worker("w1")
    st.wait_ready()
    spec = tiny_spec(
        {"path": "hym"}, teacher={"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": 3}}
    )
    with st.client() as c:
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        wait_event(r, keys, job_id, lambda e: e["kind"] == "checkpoint", 240)
        filler = fill(art)
        job = wait_final(r, keys, job_id, 240)
        evs = events(r, keys, job_id)
        assert job["status"] == "failed", dump(evs)
        assert job["error"]["code"] == "storage_full", job["error"]
        failed = [e for e in evs if e["kind"] == "status" and e["data"].get("status") == "failed"][-1]
        stage = failed["data"]["stage"]  # the stage that was writing when the disk filled up
        assert stage in ("teacher_finetune", "distill", "evaluate", "export"), dump(evs)
        assert f"in the {stage} stage" in job["error"]["message"], job["error"]
        leftovers = [n for n in listing(art / job_id) if Path(n).name.startswith(".") or ".tmp" in n]
        assert leftovers == [], leftovers

        filler.unlink()
        resp = c.post(f"/v1/jobs/{job_id}/resume")
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "queued" and resp.json()["error"] is None
        job = wait_final(r, keys, job_id, 300)
        evs = events(r, keys, job_id)
        assert job["status"] == "succeeded", dump(evs)
        assert any(e["message"].startswith("resuming from checkpoint") for e in evs), dump(evs)
        out = output_dir(st.settings, job)  # the attempt folder the record names
        for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]:
            assert hashlib.sha256((out / a["name"]).read_bytes()).hexdigest() == a["sha256"]
        # A succeeded job is not resumable: 409 with its status.
        again = c.post(f"/v1/jobs/{job_id}/resume")
        assert again.status_code == 409 and again.json()["error"]["status"] == "succeeded", again.text
