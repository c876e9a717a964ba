"""POST /v1/jobs/{id}/predict against the real app and Redis, with a real ONNX model in a finished
job's attempt folder (tests/helpers.py onnx_classifier: a colour probe, "red" and "blue"): answers,
ownership, every kind of bad input as a 4xx with a stable code and nothing loaded or cached, the
memory bound of the model cache, the concurrency limit, and a model fetched once from a bucket.
The engine's own students are checked in tests/models/test_deploy.py."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from spkd.app.main import create_app
from spkd.core import blobs, bucket, store
from spkd.core.settings import Settings
from tests.helpers import KEY_A, KEY_B, finished_job, make_settings, onnx_classifier


def png(colour: str | tuple[int, int, int], size: tuple[int, int] = (50, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def images(*parts: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (name, data, "application/octet-stream")) for name, data in parts]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_classifier(tmp_path_factory.mktemp("colour") / "files")


@pytest.fixture
def app_for(tmp_path: Path, redis_url: str) -> Iterator:
    """Start the real app with settings overrides: `app_for(**over) -> (client, settings)`."""
    made: list[tuple[TestClient, Settings]] = []

    def _make(**over: object) -> tuple[TestClient, Settings]:
        s = make_settings(tmp_path / f"s{len(made)}", redis_url, **over)
        c = TestClient(create_app(s))
        c.__enter__()
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        made.append((c, s))
        return c, s

    yield _make
    for c, s in made:
        c.__exit__(None, None, None)
        store.delete_prefix(store.connect(redis_url), s.redis_prefix)
    Image.MAX_IMAGE_PIXELS = Settings().max_image_pixels  # create_app sets Pillow's global


def cache(c: TestClient) -> dict:
    """What the app's model cache holds ({} before the first predict request made one)."""
    predictor = getattr(c.app.state, "predictor", None)
    return predictor.cache.stats() if predictor is not None else {"entries": 0, "loads": 0, "bytes": 0}


def test_predict_answers_top_k_per_image_in_order(client, r, keys, settings, model_files) -> None:
    job = finished_job(r, keys, settings, model_files, metrics={"shipped": "distilled"})
    res = client.post(
        f"/v1/jobs/{job['id']}/predict", files=images(("r.png", png("red")), ("b.png", png((0, 0, 250))))
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["job_id"] == job["id"]
    assert body["model"] == {
        "architecture": "colour_probe",
        "trained": "distilled",
        "file": "student.onnx",
        "image_size": 32,
    }
    first, second = body["predictions"]
    assert first["file"] == "r.png" and [t["label"] for t in first["top"]] == ["red", "blue"]
    assert second["file"] == "b.png" and [t["label"] for t in second["top"]] == ["blue", "red"]
    for p in body["predictions"]:
        probs = [t["probability"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-9
        assert all(t["index"] == ["red", "blue"].index(t["label"]) for t in p["top"])
    one = client.post(
        f"/v1/jobs/{job['id']}/predict", params={"top_k": 1}, files=images(("r.png", png("red")))
    )
    assert [t["label"] for t in one.json()["predictions"][0]["top"]] == ["red"]
    for bad in (0, 101, "x"):
        res = client.post(
            f"/v1/jobs/{job['id']}/predict", params={"top_k": bad}, files=images(("r", png("red")))
        )
        assert res.status_code == 422 and res.json()["error"]["field"] == "top_k", res.text
    assert cache(client)["loads"] == 1  # three requests, one load


def test_another_keys_job_answers_like_a_missing_one(client, r, keys, settings, model_files) -> None:
    job = finished_job(r, keys, settings, model_files, key=KEY_B)
    theirs = client.post(f"/v1/jobs/{job['id']}/predict", files=images(("r.png", png("red"))))
    missing = client.post("/v1/jobs/job_nosuchjob/predict", files=images(("r.png", png("red"))))
    malformed = client.post("/v1/jobs/..%2Fx/predict", files=images(("r.png", png("red"))))
    assert theirs.status_code == missing.status_code == malformed.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "job_not_found"
    assert theirs.json()["error"]["message"] == f"no job '{job['id']}' for this API key"
    assert cache(client)["loads"] == 0


def test_a_job_that_is_not_finished_or_has_no_model_is_a_409(client, r, keys, settings, model_files) -> None:
    queued = store.create_job(r, keys, store.owner_of(KEY_A), {"teacher": {}})
    res = client.post(f"/v1/jobs/{queued['id']}/predict", files=images(("r.png", png("red"))))
    assert res.status_code == 409 and res.json()["error"]["code"] == "job_not_finished", res.text
    assert res.json()["error"]["status"] == "queued"
    store.transition(r, keys, queued["id"], store.FAILED, [store.QUEUED])
    failed = client.post(f"/v1/jobs/{queued['id']}/predict", files=images(("r.png", png("red"))))
    assert failed.status_code == 409 and failed.json()["error"]["status"] == "failed"

    no_onnx = model_files.parent / "no_onnx"
    shutil.copytree(model_files, no_onnx)
    (no_onnx / "student.onnx").unlink()
    job = finished_job(r, keys, settings, no_onnx)
    res = client.post(f"/v1/jobs/{job['id']}/predict", files=images(("r.png", png("red"))))
    assert res.status_code == 409 and res.json()["error"]["code"] == "no_onnx_model", res.text

    # registered, but the file is gone from the attempt folder (a disk cleaned by hand)
    job = finished_job(r, keys, settings, model_files)
    (Path(settings.artifact_root) / job["id"] / job["output"] / "student.onnx").unlink()
    res = client.post(f"/v1/jobs/{job['id']}/predict", files=images(("r.png", png("red"))))
    assert res.status_code == 409 and res.json()["error"]["code"] == "no_onnx_model", res.text
    assert cache(client) == {"entries": 0, "bytes": 0, "loads": 0, "keys": []}


def test_bad_images_are_4xx_with_a_code_and_load_nothing(app_for, r, model_files) -> None:
    c, s = app_for(predict_max_images=3, predict_max_image_bytes=20_000, max_image_pixels=250_000)
    keys = store.Keys(s.redis_prefix)
    job = finished_job(r, keys, s, model_files)
    url = f"/v1/jobs/{job['id']}/predict"
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(jpeg, "JPEG")
    big_noise = io.BytesIO()
    Image.effect_noise((200, 200), 100).convert("RGB").save(big_noise, "PNG")  # > 20 kB, few pixels
    cases = {
        "not_an_image": images(("notes.txt", b"hello, not pixels")),
        "empty_image": images(("empty.png", b"")),
        "too_many_images": images(*[(f"{i}.png", png("red")) for i in range(4)]),
        "image_too_large": images(("noise.png", big_noise.getvalue())),
        "too_many_pixels": images(("wide.png", png("red", (600, 500)))),  # 300k pixels, tiny file
        "no_images": [("name", (None, b"just a field"))],
    }
    cases["not_an_image_truncated"] = images(("cut.jpg", jpeg.getvalue()[:200]))
    expected_status = {"image_too_large": 413, "too_many_pixels": 413}
    for code, files in cases.items():
        res = c.post(url, files=files)
        want = code.removesuffix("_truncated")
        assert res.status_code == expected_status.get(want, 422), (code, res.status_code, res.text)
        assert res.json()["error"]["code"] == want, (code, res.text)
    # The bad file is named, even when it is not the first.
    res = c.post(url, files=images(("ok.png", png("red")), ("bad.gif", b"GIF89a broken")))
    assert res.status_code == 422 and res.json()["error"]["field"] == "images[1]", res.text
    assert "bad.gif" in res.json()["error"]["message"]
    # A bomb Pillow itself refuses at open (more than twice the pixel limit): the same 413.
    res = c.post(url, files=images(("bomb.png", png("red", (1000, 1000)))))
    assert res.status_code == 413 and res.json()["error"]["code"] == "too_many_pixels", res.text
    # Not multipart at all, and a multipart body that is cut short.
    res = c.post(url, json={"images": ["a.png"]})
    assert res.status_code == 422 and res.json()["error"]["code"] == "no_images", res.text
    res = c.post(
        url,
        content=b'--x\r\nContent-Disposition: form-data; name="images"; filename="a"\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert res.status_code in (400, 422) and res.json()["error"]["code"] in ("invalid_multipart", "no_images")
    # A body past 3 x 20 kB + 1 MiB of framing: refused by its Content-Length before it is read.
    res = c.post(
        url,
        content=b"x" * (3 * 20_000 + 1024**2 + 1),
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert res.status_code == 413 and res.json()["error"]["code"] == "payload_too_large", res.text
    assert "SPKD_PREDICT_MAX_IMAGES" in res.json()["error"]["message"]
    assert cache(c)["loads"] == 0  # no bad request loaded (or kept) a model
    ok = c.post(url, files=images(("ok.jpg", jpeg.getvalue())))
    assert ok.status_code == 200 and ok.json()["predictions"][0]["top"][0]["label"] == "red", ok.text


def test_an_unreadable_model_is_reported_and_not_cached(client, r, keys, settings, model_files) -> None:
    broken = model_files.parent / "broken"
    shutil.copytree(model_files, broken, dirs_exist_ok=True)
    (broken / "student.onnx").write_bytes(b"this is not an onnx graph")
    job = finished_job(r, keys, settings, broken)
    for _ in range(2):  # tried again on the next request: a failure is not remembered either
        res = client.post(f"/v1/jobs/{job['id']}/predict", files=images(("r.png", png("red"))))
        assert res.status_code == 500 and res.json()["error"]["code"] == "model_load_failed", res.text
        assert "student.onnx" in res.json()["error"]["message"]
    assert cache(client)["entries"] == 0


def test_the_model_cache_is_bounded_by_bytes(app_for, r, model_files) -> None:
    size = (model_files / "student.onnx").stat().st_size
    c, s = app_for(predict_cache_bytes=size)  # room for one model
    keys = store.Keys(s.redis_prefix)
    one, two = (finished_job(r, keys, s, model_files) for _ in range(2))
    for job in (one, one, two, two, one):
        res = c.post(f"/v1/jobs/{job['id']}/predict", files=images(("r.png", png("red"))))
        assert res.status_code == 200, res.text
    stats = cache(c)
    assert stats["entries"] == 1 and stats["bytes"] == size and stats["loads"] == 3  # one, two, one
    assert [k[0] for k in stats["keys"]] == [one["id"]]

    tight, s2 = app_for(predict_cache_bytes=size - 1)  # no model fits: served, never kept
    job = finished_job(r, store.Keys(s2.redis_prefix), s2, model_files)
    for _ in range(2):
        assert tight.post(f"/v1/jobs/{job['id']}/predict", files=images(("r", png("red")))).status_code == 200
    assert cache(tight) == {"entries": 0, "bytes": 0, "loads": 2, "keys": []}


def test_past_the_concurrency_limit_a_429_with_retry_after(app_for, r, model_files) -> None:
    c, s = app_for(predict_concurrency=1)
    job = finished_job(r, store.Keys(s.redis_prefix), s, model_files)
    url = f"/v1/jobs/{job['id']}/predict"
    assert c.post(url, files=images(("r.png", png("red")))).status_code == 200
    slots = c.app.state.predictor.slots
    assert slots.take()  # another request holds the only slot
    try:
        busy = c.post(url, files=images(("r.png", png("red"))))
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "too_many_predictions", busy.text
        assert busy.headers["retry-after"] == "1"
    finally:
        slots.give_back()
    assert c.post(url, files=images(("r.png", png("red")))).status_code == 200
    assert slots.busy == 0  # every request gave its slot back, the failed ones too
    assert c.post(url, files=images(("x.txt", b"text"))).status_code == 422
    assert slots.busy == 0


def test_a_model_in_object_storage_is_fetched_once(app_for, r, model_files, s3_server) -> None:
    prefix = f"predict-{id(model_files)}"
    c, s = app_for(**s3_server.settings(prefix))
    remote = blobs.remote(s)

    def upload(job_id: str, folder: Path, artifacts: list[dict]) -> None:
        bucket.upload_artifacts(remote, job_id, folder, artifacts, lambda: None)

    job = finished_job(r, store.Keys(s.redis_prefix), s, model_files, upload=upload)
    assert not (Path(s.artifact_root) / job["id"]).exists()  # only the bucket has the model
    for _ in range(3):
        res = c.post(f"/v1/jobs/{job['id']}/predict", files=images(("b.png", png("blue"))))
        assert res.status_code == 200 and res.json()["predictions"][0]["top"][0]["label"] == "blue", res.text
    assert cache(c)["loads"] == 1
    assert f"jobs/{job['id']}/attempt-00000001/artifacts/student.onnx" in {
        k.removeprefix(prefix + "/") for k in s3_server.keys(prefix)
    }
