"""What operators plug into: the OpenAPI security scheme /docs uses, the Celery settings a real
worker runs with (task events and heartbeats for Flower, no cancel on a Redis blip), Flower's
login, and Prometheus metrics that stay right with several API processes."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx

from spkd.cli import procs
from spkd.core.queue import make_celery
from spkd.core.settings import Settings
from tests.helpers import (
    KEY_A,
    KEY_B,
    ROOT,
    SPKD,
    make_settings,
    settings_env,
    small_imagefolder,
    tiny_spec,
    wait_job_over_http,
)


def spec() -> dict:
    return {
        "teacher": {"model": "test_efficientnet", "weights": "none"},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": {"path": "hym"},
        "train": {"epochs": 1, "image_size": 64},
        "baseline": False,
    }


def test_openapi_declares_bearer_auth_on_every_keyed_route(client) -> None:
    doc = client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert [s for s in schemes.values() if s["type"] == "http" and s["scheme"] == "bearer"]
    name = next(iter(schemes))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1/"):
                where = f"{method.upper()} {path}"
                assert {name: []} in op.get("security", []), f"{where} sends no key from /docs"
            else:  # liveness, readiness and metrics stay open for probes and scrapers
                assert "security" not in op, f"{method.upper()} {path}"


def test_bearer_scheme_keeps_spkds_own_auth_errors(client) -> None:
    """The security dependency changes nothing for a request: same answers with and without it."""
    assert client.get("/v1/jobs").status_code == 200
    anon = client.get("/v1/jobs", headers={"Authorization": ""})
    assert anon.status_code == 401 and anon.json()["error"]["code"] == "unauthorized"
    wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_queue_depth_and_live_workers_are_metrics(client, settings: Settings) -> None:
    (Path(settings.data_root) / "hym" / "ants").mkdir(parents=True)
    for _ in range(3):
        assert client.post("/v1/jobs", json=spec()).status_code == 201
    text = client.get("/metrics").text
    assert "spkd_queue_depth 3.0" in text  # three real messages in the broker's list, no worker
    assert "spkd_workers_live 0.0" in text
    assert "spkd_http_request_duration_seconds_bucket" in text


def test_a_real_worker_runs_with_events_and_heartbeats_and_no_cancel_on_connection_loss(service) -> None:
    celery = make_celery(service.settings)
    # /readyz counts heartbeats, which start before the consumer listens for broadcasts (an
    # inspect sent then is lost, not queued): ask again until it answers
    deadline, replies = time.monotonic() + 60, {}
    while not replies and time.monotonic() < deadline:
        replies = celery.control.inspect(timeout=3).conf() or {}
    assert replies, "the worker answered no inspect call in 60 s"
    conf = next(iter(replies.values()))
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert conf["worker_send_task_events"] is True
    assert conf["task_send_sent_event"] is True

    # What Flower listens to: a heartbeat from that worker within a few seconds.
    seen: list[str] = []
    with celery.connection_for_read() as conn:
        handlers = {"worker-heartbeat": lambda e: seen.append(e["hostname"])}
        recv = celery.events.Receiver(conn, handlers=handlers)
        deadline = time.monotonic() + 10
        for _ in recv.itercapture(limit=None, timeout=10, wakeup=True):
            if seen or time.monotonic() > deadline:
                break
    assert seen, "no worker-heartbeat event in 10 s: Flower would list no worker"


def test_flower_refuses_to_start_without_a_login() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPKD_FLOWER_BASIC_AUTH"}
    for value in (None, "no-colon"):
        if value is not None:
            env["SPKD_FLOWER_BASIC_AUTH"] = value
        entrypoint = str(ROOT / "docker" / "entrypoint.sh")
        out = subprocess.run(["bash", entrypoint, "flower"], env=env, capture_output=True, text=True)
        assert out.returncode == 2 and "SPKD_FLOWER_BASIC_AUTH" in out.stderr


def _count(text: str, route: str) -> float:
    labels = f'method="GET",route="{re.escape(route)}",status="200"'
    m = re.search(rf"spkd_http_requests_total{{{labels}}} (\S+)", text)
    return float(m.group(1)) if m else 0.0


def test_request_counts_add_up_across_api_processes(tmp_path: Path, redis_url: str) -> None:
    s = make_settings(tmp_path, redis_url)
    env = dict(os.environ, **settings_env(s))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = procs.free_port()
    group = procs.Group(tmp_path / "logs", cwd=ROOT, grace_s=10)
    try:
        serve = [SPKD, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
        api = group.start("api", [*serve, "--log-level", "warning"], env)
        url = f"http://127.0.0.1:{port}"
        procs.wait_http(f"{url}/healthz", 60, [api])
        time.sleep(2)  # both processes up, so the requests below spread over them
        n = 60
        for _ in range(n):  # a new connection each: the kernel hands them to either process
            with httpx.Client(headers={"Authorization": f"Bearer {KEY_A}"}) as c:
                assert c.get(f"{url}/v1/models").status_code == 200
        counts = []
        for _ in range(6):
            with httpx.Client() as c:
                counts.append(_count(c.get(f"{url}/metrics").text, "/v1/models"))
        assert counts == [n] * len(counts), f"each scrape saw one process's share: {counts}"
    finally:
        group.stop()


def test_finished_jobs_fill_the_duration_histograms(service) -> None:
    """A real worker runs a tiny job; /metrics then has its run time by status and each stage's
    seconds (from metrics.json), and no GPU memory sample on a CPU worker."""
    small_imagefolder(Path(service.settings.data_root) / "ops-hym", per_class=4)
    with service.client() as c:
        job_id = c.post("/v1/jobs", json=tiny_spec({"path": "ops-hym"})).json()["id"]
        job = wait_job_over_http(c, job_id, 300, service.logs)
        assert job["status"] == "succeeded", (job["error"], service.logs())
        assert job["metrics"]["gpu_memory_peak_bytes"] is None  # a CPU worker
        text = c.get("/metrics").text
    assert 'spkd_job_duration_seconds_count{status="succeeded"} 1.0' in text
    assert 'spkd_job_duration_seconds_bucket{le="+Inf",status="succeeded"} 1.0' in text
    for stage in job["metrics"]["timing"]:
        assert f'spkd_stage_duration_seconds_count{{stage="{stage}"}} 1.0' in text, stage
    assert "# TYPE spkd_job_gpu_memory_peak_bytes histogram" in text
    assert "spkd_job_gpu_memory_peak_bytes_count" not in text  # nothing observed on a CPU


def test_a_model_folder_downloads_as_one_zip(service) -> None:
    import io
    import zipfile

    small_imagefolder(Path(service.settings.data_root) / "zip-hym", per_class=4)
    with service.client() as c:
        job_id = c.post("/v1/jobs", json=tiny_spec({"path": "zip-hym"})).json()["id"]
        job = wait_job_over_http(c, job_id, 300, service.logs)
        assert job["status"] == "succeeded", (job["error"], service.logs())
        resp = c.get(f"/v1/jobs/{job_id}/artifacts/student", params={"format": "zip"})
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
            names = sorted(zf.namelist())
            assert names == ["student/README.md", "student/config.json", "student/model.safetensors"]
            for name in names:  # the same bytes as each file's own download
                assert zf.read(name) == c.get(f"/v1/jobs/{job_id}/artifacts/{name}").content
        assert c.get(f"/v1/jobs/{job_id}/artifacts/nothing", params={"format": "zip"}).status_code == 404
        # the folder's name without ?format=zip: a 404 that says how to get it
        plain = c.get(f"/v1/jobs/{job_id}/artifacts/student")
        assert plain.status_code == 404, plain.text
        assert (
            "?format=zip" in plain.json()["error"]["message"]
            and "student/" in plain.json()["error"]["message"]
        )
        assert c.get(f"/v1/jobs/{job_id}/artifacts/student", params={"format": "tar"}).status_code == 422
    with service.client(key=KEY_B) as other:
        assert other.get(f"/v1/jobs/{job_id}/artifacts/student", params={"format": "zip"}).status_code == 404
