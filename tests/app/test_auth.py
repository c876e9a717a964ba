"""Auth, in-process app against the real Redis: every data endpoint needs a key,
one key never reaches another key's jobs, datasets or artifacts, keys are never stored in clear,
and wrong keys are rate-limited per client address."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import redis
from fastapi.testclient import TestClient
from PIL import Image

from spkd.app.auth import AuthLimiter
from spkd.common.files import manifest
from spkd.core import store
from spkd.core.settings import Settings
from tests.helpers import KEY_A, KEY_B, tiny_spec

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/", "/static/{name}", "/static/{name:path}"}
BOB = {"Authorization": f"Bearer {KEY_B}"}


def _zip_two_classes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, cls in enumerate(("a", "b", "a", "b")):
            img = io.BytesIO()
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(img, "JPEG")
            zf.writestr(f"{cls}/{i}.jpg", img.getvalue())
    return buf.getvalue()


def _concrete(path: str) -> str:
    return path.replace("{job_id}", "job_x").replace("{ds_id}", "ds_x").replace("{name}", "n")


def test_every_data_endpoint_needs_a_key(settings: Settings) -> None:
    from spkd.app.main import create_app

    # One wrong key per operation: more operations than the default wrong keys per window (the
    # limiter itself is tested below).
    roomy = settings.model_copy(update={"auth_fail_limit": 10_000})
    with TestClient(create_app(roomy)) as client:
        ops = [
            (method, path)
            for path, item in client.get("/openapi.json").json()["paths"].items()
            for method in item
            if path not in OPEN_PATHS
        ]
        assert len(ops) >= 10, ops
        for method, path in ops:
            for auth in ("", "Bearer ", "Basic dGVzdDp0ZXN0", f"Bearer {KEY_A}x", KEY_A):
                resp = client.request(method.upper(), _concrete(path), headers={"Authorization": auth})
                assert resp.status_code == 401, (method, path, auth, resp.status_code, resp.text)
                assert resp.headers["www-authenticate"] == "Bearer"


def test_cross_key_isolation_everywhere(client, r, keys, settings: Settings) -> None:
    ds = client.post(
        "/v1/datasets", content=_zip_two_classes(), headers={"Content-Type": "application/zip"}
    ).json()
    job = client.post("/v1/jobs", json=tiny_spec({"id": ds["id"]})).json()
    jid = job["id"]
    out = Path(settings.artifact_root) / jid
    out.mkdir(parents=True)
    (out / "student.safetensors").write_bytes(b"w" * 100)
    store.set_artifacts(r, keys, jid, manifest(out))
    assert client.get(f"/v1/jobs/{jid}/artifacts/student.safetensors").status_code == 200

    # Bob: every read, the stream, the downloads and the cancel answer 404 (no existence oracle).
    for method, path in [
        ("GET", f"/v1/jobs/{jid}"),
        ("GET", f"/v1/jobs/{jid}/events"),
        ("GET", f"/v1/jobs/{jid}/events?stream=true"),
        ("GET", f"/v1/jobs/{jid}/artifacts"),
        ("GET", f"/v1/jobs/{jid}/artifacts/student.safetensors"),
        ("POST", f"/v1/jobs/{jid}/cancel"),
        ("GET", f"/v1/datasets/{ds['id']}"),
    ]:
        resp = client.request(method, path, headers=BOB)
        assert resp.status_code == 404, (method, path, resp.text)
        assert ds["id"] not in resp.text or "for this API key" in resp.text
        assert "student.safetensors" not in resp.text or path.endswith("safetensors")
    assert client.get("/v1/jobs", headers=BOB).json()["data"] == []
    assert client.get("/v1/jobs?status=queued", headers=BOB).json()["data"] == []
    assert client.get("/v1/datasets", headers=BOB).json()["data"] == []
    # Nor can Bob build on Alice's dataset or reuse her job's weights.
    steal_ds = client.post("/v1/jobs", json=tiny_spec({"id": ds["id"]}), headers=BOB)
    assert steal_ds.status_code == 422 and steal_ds.json()["error"]["code"] == "dataset_not_found"
    spec = tiny_spec({"id": ds["id"]}, student={"model": "test_resnet", "weights": f"job:{jid}"})
    steal_w = client.post("/v1/jobs", json=spec, headers=BOB)
    assert steal_w.status_code == 422 and steal_w.json()["error"]["code"] in (
        "dataset_not_found",
        "weights_job_not_found",
    )
    (Path(settings.data_root) / "shared").mkdir()
    spec["dataset"] = {"path": "shared"}
    steal_w = client.post("/v1/jobs", json=spec, headers=BOB)
    assert steal_w.json()["error"]["code"] == "weights_job_not_found", steal_w.text
    # Bob's cancel changed nothing for Alice.
    mine = client.get(f"/v1/jobs/{jid}").json()
    assert mine["status"] == "queued" and mine["cancel_requested"] is False


def _all_values(r: redis.Redis, prefix: str) -> str:
    """Every key name and value under the prefix, as one string."""
    out = []
    for k in r.scan_iter(match=f"{prefix}:*", count=1000):
        t = r.type(k)
        out.append(k)
        if t == "string":
            out.append(r.get(k) or "")
        elif t == "hash":
            out.extend(f"{a}={b}" for a, b in r.hgetall(k).items())
        elif t == "zset":
            out.extend(r.zrange(k, 0, -1))
        elif t == "list":
            out.extend(r.lrange(k, 0, -1))
        elif t == "set":
            out.extend(r.smembers(k))
        elif t == "stream":
            out.extend(str(f) for _, f in r.xrange(k))
    return "\n".join(out)


def test_keys_never_stored_in_clear(client, r, settings: Settings) -> None:
    client.post("/v1/datasets", content=_zip_two_classes(), headers={"Content-Type": "application/zip"})
    (Path(settings.data_root) / "shared").mkdir()
    client.post("/v1/jobs", json=tiny_spec({"path": "shared"}), headers={"Idempotency-Key": KEY_A})
    client.post("/v1/jobs", json=tiny_spec({"path": "shared"}), headers=BOB)
    client.get("/v1/jobs", headers={"Authorization": "Bearer not-a-key"})
    dumped = _all_values(r, settings.redis_prefix)
    assert len(dumped) > 500 and store.owner_of(KEY_A) in dumped  # the hash is there...
    for secret in (KEY_A, KEY_B, "not-a-key"):
        assert secret not in dumped  # ...the key itself never is


def test_wrong_keys_are_rate_limited(client, r, keys, settings: Settings) -> None:
    limited = settings.model_copy(update={"auth_fail_limit": 5, "auth_fail_window_s": 3})
    client.app.state.auth_limiter = AuthLimiter(r, keys, limited)
    wrong = {"Authorization": "Bearer guess"}
    codes = [client.get("/v1/jobs", headers=wrong).status_code for _ in range(5)]
    assert codes == [401] * 5
    blocked = client.get("/v1/jobs", headers=wrong)
    assert blocked.status_code == 429 and blocked.json()["error"]["code"] == "too_many_auth_failures"
    assert 1 <= int(blocked.headers["retry-after"]) <= 3
    # Only wrong keys are throttled: the right key from the same address still works.
    assert client.get("/v1/jobs").status_code == 200
    assert client.get("/v1/jobs", headers=wrong).status_code == 429
    # Another address is not affected; missing headers are not counted as guesses.
    with TestClient(client.app, client=("10.1.2.3", 4000)) as other:
        assert other.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
        assert all(other.get("/v1/jobs").status_code == 401 for _ in range(7))
        assert other.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    time.sleep(3.2)
    assert client.get("/v1/jobs", headers=wrong).status_code == 401  # the window is over
    assert client.get("/healthz", headers=wrong).status_code == 200
