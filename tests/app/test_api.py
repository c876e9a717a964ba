"""The API in-process (TestClient) against the real Redis: auth, errors, jobs, pagination,
idempotency, cancel, events, artifacts, models, stages, readiness, metrics, OpenAPI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spkd.core import store
from spkd.core.settings import Settings
from tests.helpers import KEY_B, ROOT


def spec(ds: dict | None = None, **over: object) -> dict:
    body = {
        "teacher": {"model": "test_efficientnet", "weights": "none"},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": ds or {"path": "hym"},
        "train": {"epochs": 1, "image_size": 64},
        "baseline": False,
    }
    body.update(over)
    return body


@pytest.fixture
def data_folder(settings: Settings) -> Path:
    d = Path(settings.data_root) / "hym" / "ants"
    d.mkdir(parents=True)
    return d.parent


def test_api_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "import spkd.app.main, spkd.cli.client, spkd.cli.files, spkd.cli.jobs\n"
        "c = TestClient(spkd.app.main.app)\n"
        "assert c.get('/healthz').status_code == 200\n"
        "assert c.get('/openapi.json').status_code == 200\n"
        "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_auth_and_error_shape(client) -> None:
    anon = client.get("/v1/jobs", headers={"Authorization": ""})
    assert anon.status_code == 401 and anon.json()["error"]["code"] == "unauthorized"
    assert anon.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    missing = client.get("/v1/jobs/job_doesnotexist")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "code": "job_not_found",
            "message": "no job 'job_doesnotexist' for this API key",
            "field": None,
        }
    }
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert client.delete("/v1/jobs").json()["error"]["code"] == "method_not_allowed"
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}


def test_create_validates_spec_models_and_dataset(client, data_folder: Path) -> None:
    bad = client.post("/v1/jobs", json=spec(train={"epochs": 0}))
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "train.epochs"
    extra = client.post("/v1/jobs", json=dict(spec(), surprise=1))
    assert extra.status_code == 422 and extra.json()["error"]["field"] == "surprise"
    typo = client.post("/v1/jobs", json=spec(teacher={"model": "resnet5O", "weights": "none"}))
    err = typo.json()["error"]
    assert typo.status_code == 422 and err["code"] == "unknown_model" and err["field"] == "teacher.model"
    assert "resnet50" in err["suggestions"] and "resnet50" in err["message"]
    tag = client.post("/v1/jobs", json=spec(student={"model": "resnet18.nope", "weights": "none"}))
    assert (
        tag.json()["error"]["field"] == "student.model"
        and "resnet18.a1_in1k" in tag.json()["error"]["suggestions"]
    )
    pkg = client.post("/v1/jobs", json=spec(student={"model": "test_resnet", "weights": "package"}))
    assert pkg.json()["error"] == {
        "code": "weights_unavailable",
        "message": pkg.json()["error"]["message"],
        "field": "student.weights",
    }
    hub = client.post("/v1/jobs", json=spec(student={"model": "resnet18", "weights": "hub"}))
    assert hub.json()["error"]["code"] == "weights_unavailable"  # hub_weights=False in tests
    escape = client.post("/v1/jobs", json=spec({"path": "../../etc"}))
    assert escape.json()["error"]["code"] == "dataset_path_not_allowed"
    nods = client.post("/v1/jobs", json=spec({"id": "ds_missing"}))
    assert nods.json()["error"] == {
        "code": "dataset_not_found",
        "message": "no dataset 'ds_missing' for this API key",
        "field": "dataset.id",
    }
    wfile = client.post(
        "/v1/jobs", json=spec(teacher={"model": "test_resnet", "weights": "/etc/x.safetensors"})
    )
    assert wfile.json()["error"]["code"] == "weights_not_allowed"
    ok = client.post("/v1/jobs", json=spec())
    assert ok.status_code == 201 and ok.json()["status"] == "queued"
    assert ok.headers["location"] == f"/v1/jobs/{ok.json()['id']}"


def test_create_checks_train_devices(client, settings: Settings, data_folder: Path) -> None:
    many = settings.max_devices + 1
    big = client.post("/v1/jobs", json=spec(train={"epochs": 1, "batch_size": 2 * many, "devices": many}))
    err = big.json()["error"]
    assert big.status_code == 422 and err["code"] == "too_many_devices" and err["field"] == "train.devices"
    assert f"SPKD_MAX_DEVICES={settings.max_devices}" in err["message"]
    odd = client.post("/v1/jobs", json=spec(train={"epochs": 1, "batch_size": 9, "devices": 2}))
    assert odd.status_code == 422 and "does not split into 2 equal shares" in odd.json()["error"]["message"]
    ok = client.post("/v1/jobs", json=spec(train={"epochs": 1, "batch_size": 8, "devices": 2}))
    assert ok.status_code == 201 and ok.json()["spec"]["train"]["devices"] == 2


def test_a_job_goes_to_the_queue_of_its_device_count_and_says_when_no_worker_fits(
    client, r, keys, settings: Settings, data_folder: Path
) -> None:
    def warnings(job_id: str) -> list[dict]:
        log = client.get(f"/v1/jobs/{job_id}/events").json()
        return [e for e in log["data"] if e["data"].get("code") == "no_worker_fits"]

    broker = f"{settings.redis_prefix}:celery:"
    store.heartbeat(r, keys, "one-gpu", {"queue": settings.queue, "devices": 1}, settings.heartbeat_ttl_s)
    assert client.get("/readyz").json()["max_devices"] == 1  # an operator sees the capacity too
    two = client.post("/v1/jobs", json=spec(train={"epochs": 1, "batch_size": 8, "devices": 2})).json()
    assert r.llen(f"{broker}{settings.queue}.devices.2") == 1 and r.llen(f"{broker}{settings.queue}") == 0
    said = warnings(two["id"])
    assert len(said) == 1 and "no live worker has 2 devices (the largest has 1)" in said[0]["message"]
    one = client.post("/v1/jobs", json=spec()).json()  # every worker takes one-device jobs
    assert r.llen(f"{broker}{settings.queue}") == 1 and warnings(one["id"]) == []
    store.heartbeat(r, keys, "two-gpus", {"queue": settings.queue, "devices": 2}, settings.heartbeat_ttl_s)
    assert client.get("/readyz").json()["max_devices"] == 2
    fits = client.post("/v1/jobs", json=spec(train={"epochs": 1, "batch_size": 8, "devices": 2})).json()
    assert warnings(fits["id"]) == [] and r.llen(f"{broker}{settings.queue}.devices.2") == 2


def test_idempotency_key(client, data_folder: Path) -> None:
    h = {"Idempotency-Key": "abc"}
    first = client.post("/v1/jobs", json=spec(), headers=h)
    again = client.post("/v1/jobs", json=spec(), headers=h)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = client.post("/v1/jobs", json=spec(train={"epochs": 2, "image_size": 64}), headers=h)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per owner: the same key from another API key is a different job.
    bob = client.post("/v1/jobs", json=spec(), headers={**h, "Authorization": f"Bearer {KEY_B}"})
    assert bob.status_code == 201 and bob.json()["id"] != first.json()["id"]
    assert len(client.get("/v1/jobs").json()["data"]) == 1


def test_list_pagination_status_filter_and_isolation(client, r, keys, data_folder: Path) -> None:
    ids = [client.post("/v1/jobs", json=spec()).json()["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert seen == ids[::-1]  # newest first, each once
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert len(client.get("/v1/jobs", params={"status": "queued"}).json()["data"]) == 4
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    bob = {"Authorization": f"Bearer {KEY_B}"}
    assert client.get("/v1/jobs", headers=bob).json()["data"] == []
    assert client.get(f"/v1/jobs/{ids[0]}", headers=bob).status_code == 404
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=bob).status_code == 404
    assert client.get(f"/v1/jobs/{ids[0]}/events", headers=bob).status_code == 404
    assert store.count_by_status(r, keys)["queued"] == 4


def test_cancel_states(client, r, keys, data_folder: Path) -> None:
    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    store.transition(r, keys, job_id, store.VALIDATING, [store.QUEUED])
    running = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert running["status"] == "validating" and running["cancel_requested"] is True
    assert store.cancel_requested(r, keys, job_id)
    # Accepted (200): from now on the job can only end cancelled.
    with pytest.raises(store.CancelPending):
        store.transition(r, keys, job_id, store.FAILED, [store.VALIDATING])
    store.transition(r, keys, job_id, store.CANCELLED, [store.VALIDATING])
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    other = client.post("/v1/jobs", json=spec()).json()["id"]
    store.transition(r, keys, other, store.FAILED, [store.QUEUED])
    done = client.post(f"/v1/jobs/{other}/cancel")
    assert done.status_code == 409, done.text
    assert done.json()["error"]["code"] == "job_finished" and done.json()["error"]["status"] == "failed"


def test_resume_checks_what_the_job_names_first(
    client, r, keys, settings: Settings, data_folder: Path
) -> None:
    """A failed job whose dataset is gone since (deleted, moved) is refused at once (409 naming the
    reference), not queued to fail again on a worker."""
    import shutil

    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    store.transition(r, keys, job_id, store.FAILED, [store.QUEUED])
    ckpt = Path(settings.artifact_root) / job_id / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a checkpoint")
    shutil.rmtree(data_folder)
    resp = client.post(f"/v1/jobs/{job_id}/resume")
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["code"] == "job_not_resumable" and err["field"] == "dataset.path", err
    assert "no folder 'hym' under the server's data root" in err["message"], err
    assert store.get_job(r, keys, job_id)["status"] == "failed"
    (data_folder / "ants").mkdir(parents=True)  # back in place: the resume goes through
    again = client.post(f"/v1/jobs/{job_id}/resume")
    assert again.status_code == 200 and again.json()["status"] == "queued", again.text


def test_events_json_and_sse_resume(client, r, keys, data_folder: Path) -> None:
    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    store.add_event(r, keys, job_id, "info", "hello", n=1)
    store.update_job(
        r, keys, job_id, progress={"stage": "distill", "epoch": 1, "epochs": 2, "step": 3, "steps": 9}
    )
    store.transition(r, keys, job_id, store.CANCELLED, [store.QUEUED])
    log = client.get(f"/v1/jobs/{job_id}/events").json()
    assert [e["kind"] for e in log["data"]] == ["status", "info", "status"] and log["status"] == "cancelled"
    assert log["data"][1]["data"] == {"n": 1}
    first_id = log["data"][0]["id"]
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": first_id, "Accept": "text/event-stream"}
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = "".join(resp.iter_text())
    frames = [f for f in body.split("\n\n") if f.startswith("id:") or f.startswith("event:")]
    names = [next(line[7:] for line in f.splitlines() if line.startswith("event: ")) for f in frames]
    assert names == ["info", "status", "progress", "end"]  # resumed after the first event
    assert json.loads(frames[-1].split("data: ")[1]) == {"status": "cancelled"}
    bad = client.get(f"/v1/jobs/{job_id}/events", params={"after": "bad"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"


def test_artifacts_listing_and_download(client, r, keys, settings: Settings, data_folder: Path) -> None:
    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    out = Path(settings.artifact_root) / job_id
    out.mkdir(parents=True)
    (out / "student.safetensors").write_bytes(b"x" * 5000)
    (out / "secret.txt").write_text("not registered")
    from spkd.common.files import manifest

    arts = manifest(out)
    store.set_artifacts(r, keys, job_id, [a for a in arts if a["name"] != "secret.txt"])
    listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert [a["name"] for a in listed] == ["student.safetensors"] and listed[0]["size"] == 5000
    dl = client.get(f"/v1/jobs/{job_id}/artifacts/student.safetensors")
    assert dl.content == b"x" * 5000 and dl.headers["x-checksum-sha256"] == listed[0]["sha256"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts/secret.txt").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/artifacts/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_artifacts_in_folders_download(client, r, keys, settings: Settings, data_folder: Path) -> None:
    """TensorBoard files live in tensorboard/<stage>/...: listed, and downloadable by that name
    (plain or with the slashes %-encoded, as the dashboard sends them); `..` stays a 404."""
    job_id = client.post("/v1/jobs", json=spec()).json()["id"]
    out = Path(settings.artifact_root) / job_id
    nested = out / "tensorboard" / "distill" / "steps" / "events.out.tfevents.1.host.2.0"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"tb" * 100)
    from spkd.common.files import manifest

    store.set_artifacts(r, keys, job_id, manifest(out))
    name = "tensorboard/distill/steps/events.out.tfevents.1.host.2.0"
    assert [a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]] == [name]
    for path in (name, name.replace("/", "%2F")):
        dl = client.get(f"/v1/jobs/{job_id}/artifacts/{path}")
        assert dl.status_code == 200 and dl.content == b"tb" * 100
    for bad in ("tensorboard/../tensorboard/distill", "tensorboard/.hidden", "tensorboard//x"):
        assert client.get(f"/v1/jobs/{job_id}/artifacts/{bad}").status_code == 404


def test_models_endpoint(client, settings: Settings) -> None:
    (Path(settings.weights_roots) / "t.safetensors").write_bytes(b"0")
    page = client.get("/v1/models", params={"q": "efficientnet_lite"}).json()
    lite0 = next(m for m in page["data"] if m["name"] == "tf_efficientnet_lite0")
    assert lite0["weights"] == ["none", "package"]  # no hub on this offline test server
    assert page["weight_files"][0]["path"].endswith("t.safetensors")
    assert client.get("/v1/models").json()["total"] > 1000


def test_stages_endpoint_lists_the_one_stage_list(client) -> None:
    """GET /v1/stages is common.spec's stage list in run order, with what the dashboard needs to
    name the stages and plan a job's progress; it needs a key like every /v1 route."""
    from spkd.common.spec import STAGES

    page = client.get("/v1/stages").json()
    assert [s["name"] for s in page["data"]] == list(STAGES)
    by_name = {s["name"]: s for s in page["data"]}
    assert by_name["teacher_finetune"] == {
        "name": "teacher_finetune",
        "title": "Teacher fine-tune",
        "trains": True,
        "planned_by": "teacher.finetune",
        "epochs_from": "teacher.finetune.epochs",
        "result": "teacher",
    }
    assert by_name["export"]["trains"] is False and by_name["export"]["planned_by"] is None
    assert all(s["title"] for s in page["data"])
    anon = client.get("/v1/stages", headers={"Authorization": ""})
    assert anon.status_code == 401 and anon.json()["error"]["code"] == "unauthorized"


def test_readyz_follows_worker_heartbeats(client, r, keys, settings: Settings) -> None:
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["workers"] == 0
    store.heartbeat(r, keys, "w1", {"queue": settings.queue}, settings.heartbeat_ttl_s)
    assert client.get("/readyz").json() == {
        "status": "ready",
        "redis": True,
        "workers": 1,
        "max_devices": 1,
        "detail": None,
    }
    r.zadd(keys.workers(), {"w1": time.time() - 60})  # went silent
    assert client.get("/readyz").status_code == 503


def test_metrics(client, data_folder: Path) -> None:
    client.post("/v1/jobs", json=spec())
    client.get("/v1/jobs/job_x")
    text = client.get("/metrics").text
    assert 'spkd_http_requests_total{method="POST",route="/v1/jobs",status="201"} 1.0' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert 'spkd_jobs{status="queued"} 1.0' in text


def test_redis_down_is_503(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spkd.app.main import create_app

    s = Settings(redis_url="redis://127.0.0.1:1/0", api_keys="k", data_root=tmp_path, artifact_root=tmp_path)
    with TestClient(create_app(s)) as c:
        resp = c.get("/v1/jobs", headers={"Authorization": "Bearer k"})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
        assert resp.json()["error"]["code"] == "store_unavailable"
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False


def test_openapi_documents_every_endpoint(client) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        ("post", "/v1/datasets"),
        ("get", "/v1/datasets"),
        ("get", "/v1/datasets/{ds_id}"),
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/{job_id}"),
        ("get", "/v1/jobs/{job_id}/events"),
        ("post", "/v1/jobs/{job_id}/cancel"),
        ("get", "/v1/jobs/{job_id}/artifacts"),
        ("get", "/v1/jobs/{job_id}/artifacts/{name}"),
        ("get", "/v1/models"),
        ("get", "/v1/stages"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    }
    assert expected <= {(m, p) for p, ops in paths.items() for m in ops}
    assert paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    schemas = doc["components"]["schemas"]
    for name in ("Job", "Dataset", "Event", "Artifact", "ModelList", "StageList", "ErrorResponse"):
        assert "example" in schemas[name], name


def test_serve_refuses_without_keys() -> None:
    from spkd.app.auth import check_can_serve

    with pytest.raises(SystemExit, match="without API keys"):
        check_can_serve(Settings(api_keys=""), "127.0.0.1")
    with pytest.raises(SystemExit, match="loopback only"):
        check_can_serve(Settings(api_keys="", allow_open=True), "0.0.0.0")
    check_can_serve(Settings(api_keys="", allow_open=True), "127.0.0.1")
    check_can_serve(Settings(api_keys="k"), "0.0.0.0")


def test_serve_warns_about_guessable_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """A short key still serves (refusing would lock out a running deployment) but says so, without
    printing any key."""
    from spkd.app.auth import MIN_KEY_LENGTH, check_can_serve

    check_can_serve(Settings(api_keys="short,also-short," + "k" * MIN_KEY_LENGTH), "0.0.0.0")
    err = capsys.readouterr().err
    assert "2 of the 3 API keys" in err and f"{MIN_KEY_LENGTH} characters" in err and "short" not in err, err
    check_can_serve(Settings(api_keys="k" * MIN_KEY_LENGTH), "0.0.0.0")
    assert capsys.readouterr().err == ""
    env = {"SPKD_API_KEYS": "", "SPKD_ALLOW_OPEN": "false", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "spkd"), "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode != 0 and "refusing to serve without API keys" in out.stderr
