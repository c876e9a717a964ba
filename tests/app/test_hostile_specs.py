"""Hostile job specs: a clear 422 naming the field at POST, and the worker
re-checks what it is given (paths swapped after POST), never unpickles code from a weights file,
and runs a student larger than its teacher with a warning.

The API in-process (TestClient) and the worker's own entry point (`execute_job`) against the real
Redis; the engine runs for real on tiny models."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from spkd.core import store
from spkd.core.settings import Settings
from spkd.workers.runner import execute_job
from tests.helpers import dump, events, output_dir, small_imagefolder, tiny_spec

torch.set_num_threads(1)


def _with(path: str, value: object) -> dict:
    """tiny_spec with one dotted field set (a missing dict on the way is created)."""
    spec = tiny_spec({"path": "hym"})
    node = spec
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node[p]
    node[leaf] = value
    return spec


BAD_FIELDS = [
    ("train.surprise", 1, "train.surprise"),
    ("teacher.pretrained", True, "teacher.pretrained"),
    ("distill.layers", [{"teacher": "x", "student": "y", "extra": 1}], "distill.layers"),
    ("train.lr", -0.1, "train.lr"),
    ("train.lr", 1e9, "train.lr"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.batch_size", 1, "train.batch_size"),  # SP over one image is 0: zero real steps
    ("train.batch_size", 10**9, "train.batch_size"),
    ("train.epochs", -3, "train.epochs"),
    ("train.epochs", 10**12, "train.epochs"),
    ("train.epochs", "ten", "train.epochs"),
    ("train.image_size", 100_000, "train.image_size"),
    ("train.image_size", 1, "train.image_size"),
    ("train.seed", -1, "train.seed"),
    ("train.weight_decay", 5, "train.weight_decay"),
    ("train.num_workers", 10_000, "train.num_workers"),
    ("train.precision", "fp8", "train.precision"),
    ("distill.temperature", 0, "distill.temperature"),
    ("distill.sp_weight", -1, "distill.sp_weight"),
    ("distill.kd_weight", 1e12, "distill.kd_weight"),
    ("distill.teacher_views", 0, "distill.teacher_views"),
    ("distill.layers", [], "distill.layers"),
    ("distill.methods", {"rkd": {"angle_weight": -1}}, "distill.methods"),
    ("distill.methods", {"rkd": {"typo": 1}}, "distill.methods"),
    ("dataset.val_fraction", 1.5, "dataset.val_fraction"),
    ("dataset.id", "ds_../../etc", "dataset.id"),
    ("teacher.finetune", {"epochs": 0}, "teacher.finetune.epochs"),
    ("teacher.model", "../../etc/passwd", "teacher.model"),
    ("student.model", "resnet18; rm -rf /", "student.model"),
    ("student.weights", "/etc/passwd", "student.weights"),
    ("student.weights", "job:../../x", "student.weights"),
    ("baseline", "maybe", "baseline"),
]


@pytest.fixture
def data(settings: Settings) -> Path:
    return small_imagefolder(Path(settings.data_root) / "hym", per_class=4)


@pytest.mark.parametrize(("path", "value", "field"), BAD_FIELDS)
def test_bad_field_is_422_naming_it(client, data: Path, path: str, value: object, field: str) -> None:
    resp = client.post("/v1/jobs", json=_with(path, value))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["field"].startswith(field.split(".")[0]) and err["message"], err
    assert (
        field in err["field"]
        or field in err["message"]
        or any(field in d["field"] for d in err.get("details", []))
    ), err


def test_unknown_distillation_method_is_422_listing_the_known_ones(client, data: Path) -> None:
    resp = client.post("/v1/jobs", json=_with("distill.methods", {"fitnets": {"weight": 1}}))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["field"] == "distill.methods", err
    assert "'fitnets'" in err["message"] and "known methods: dist, rkd" in err["message"], err
    ok = client.post("/v1/jobs", json=_with("distill.methods", {"rkd": {"angle_weight": 0}}))
    assert ok.status_code in (201, 202), ok.text  # a known one with valid options is accepted


@pytest.mark.parametrize(
    "body",
    [
        b'{"train": {"lr": NaN}}',
        b'{"train": {"lr": Infinity}}',
        b"[1, 2, 3]",
        b"null",
        b'"a string"',
        b"{" * 50_000,
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not json",
    ],
)
def test_malformed_bodies_are_4xx(client, body: bytes) -> None:
    resp = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 422), (body[:30], resp.status_code, resp.text[:300])
    assert resp.json()["error"]["code"] in ("invalid_request", "bad_request")


def test_error_messages_read_as_sentences(client, data: Path) -> None:
    """No parser internals in an error: a body that is not JSON says so (no field "1", the byte
    offset), and a spec check's message has no pydantic "Value error, " prefix."""
    resp = client.post(
        "/v1/jobs", content=b'{"train": {"lr": 0.1,}}', headers={"Content-Type": "application/json"}
    )
    err = resp.json()["error"]
    assert resp.status_code == 422 and err["field"] is None, err
    assert (
        err["message"].startswith("the request body is not valid JSON") and "character" in err["message"]
    ), err
    bad = _with("train.batch_size", 1)
    err = client.post("/v1/jobs", json=bad).json()["error"]
    assert err["field"] == "train.batch_size" and "Value error" not in err["message"], err
    assert "Value error" not in str(err.get("details")), err


def test_paths_outside_the_roots(client, settings: Settings, data: Path, tmp_path: Path) -> None:
    outside = small_imagefolder(tmp_path / "outside", per_class=2)
    (Path(settings.data_root) / "escape").symlink_to(outside, target_is_directory=True)
    weights_root = Path(settings.weights_roots)
    (tmp_path / "outside" / "w.pth").write_bytes(b"x")
    (weights_root / "link.pth").symlink_to(tmp_path / "outside" / "w.pth")
    for ds_path in ("../outside", str(outside), "escape", "hym/../../outside", "hym/\x00x", "/etc"):
        resp = client.post("/v1/jobs", json=tiny_spec({"path": ds_path}))
        assert resp.status_code == 422, (ds_path, resp.text)
        assert resp.json()["error"]["code"] in ("dataset_path_not_allowed", "invalid_request"), resp.text
    for w in (str(tmp_path / "outside" / "w.pth"), "../outside/w.pth", "link.pth", "../../../../etc/x.pth"):
        resp = client.post(
            "/v1/jobs", json=tiny_spec({"path": "hym"}, student={"model": "test_resnet", "weights": w})
        )
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "weights_not_allowed", (
            w,
            resp.text,
        )
        assert resp.json()["error"]["field"] == "student.weights"


class _Payload:
    """Unpickling this would create `marker`: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bombs(root: Path, marker: Path) -> list[str]:
    torch.save({"conv.weight": torch.zeros(1), "x": _Payload(marker)}, root / "bomb_zip.pth")
    (root / "bomb_legacy.pt").write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    (root / "bomb_fake.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    return ["bomb_zip.pth", "bomb_legacy.pt", "bomb_fake.safetensors"]


def _run(client, r, keys, settings: Settings, spec: dict) -> dict:
    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    execute_job(r, keys, settings, job_id, "test-worker")
    return store.get_job(r, keys, job_id)


@pytest.mark.slow
def test_pickle_bomb_never_executes(client, r, keys, settings: Settings, data: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name in _bombs(Path(settings.weights_roots), marker):
        job = _run(
            client,
            r,
            keys,
            settings,
            tiny_spec({"path": "hym"}, teacher={"model": "test_efficientnet", "weights": name}),
        )
        assert job["status"] == "failed", dump(events(r, keys, job["id"]))
        assert job["error"]["field"] == "teacher.weights", job["error"]
        assert job["error"]["code"] in ("unsafe_weights", "bad_weights"), job["error"]
        assert not marker.exists(), f"{name}: unpickling ran code"
    assert not marker.exists()


@pytest.mark.slow
def test_worker_rechecks_paths_swapped_after_post(
    client, r, keys, settings: Settings, data: Path, tmp_path: Path
) -> None:
    """Valid at POST, then replaced by a symlink out of the roots before a worker takes it."""
    outside = small_imagefolder(tmp_path / "outside", per_class=2)
    swap = Path(settings.data_root) / "swap"
    small_imagefolder(swap, per_class=2)
    ds_job = client.post("/v1/jobs", json=tiny_spec({"path": "swap"})).json()
    shutil.rmtree(swap)
    swap.symlink_to(outside, target_is_directory=True)
    execute_job(r, keys, settings, ds_job["id"], "test-worker")
    job = store.get_job(r, keys, ds_job["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "dataset_path_not_allowed", job

    good = Path(settings.weights_roots) / "ok.pth"
    torch.save({}, good)
    w_job = client.post(
        "/v1/jobs", json=tiny_spec({"path": "hym"}, student={"model": "test_resnet", "weights": "ok.pth"})
    ).json()
    good.unlink()
    torch.save({}, tmp_path / "outside" / "w.pth")
    good.symlink_to(tmp_path / "outside" / "w.pth")
    execute_job(r, keys, settings, w_job["id"], "test-worker")
    job = store.get_job(r, keys, w_job["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "weights_not_allowed", job
    assert job["error"]["field"] == "student.weights"


@pytest.mark.slow
def test_student_larger_than_teacher_runs_with_a_warning(
    client, r, keys, settings: Settings, data: Path
) -> None:
    spec = tiny_spec({"path": "hym"})  # test_resnet (373k parameters) from test_efficientnet (100k)
    job = _run(client, r, keys, settings, spec)
    evs = events(r, keys, job["id"])
    assert job["status"] == "succeeded", dump(evs)
    warnings = [
        e["message"] for e in evs if e["kind"] == "warning" and "larger than the teacher" in e["message"]
    ]
    assert len(warnings) == 1, dump(evs)
    assert any("larger than the teacher" in w for w in job["warnings"])
    assert json.loads(json.dumps(job["metrics"]))["distilled"]["report_acc"] is not None
    assert os.path.isfile(output_dir(settings, job) / "student.onnx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without a CUDA GPU")
def test_a_worker_started_for_a_gpu_it_cannot_see_says_so(
    client, r, keys, settings: Settings, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`spkd worker --gpu 0` (CUDA_VISIBLE_DEVICES=0) on a host whose torch sees no GPU (no driver,
    a CPU-only wheel, a container without the GPU) trains on the CPU: the job says so."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    job = _run(client, r, keys, settings, tiny_spec({"path": "hym"}))
    evs = events(r, keys, job["id"])
    assert job["status"] == "succeeded", dump(evs)
    said = [e for e in evs if e["kind"] == "warning" and "sees no CUDA GPU" in e["message"]]
    assert len(said) == 1 and said[0]["data"]["gpu"] == "0", dump(evs)
    assert "trains on the CPU" in said[0]["message"]


# ------------------------------------------------------------- MLflow servers a job may name
ALLOWED_MLFLOW = "https://mlflow.internal:5000,http://10.0.0.7/mlflow"


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("https://mlflow.internal:5000", True),
        ("https://MLflow.Internal:5000/", True),
        ("http://10.0.0.7/mlflow", True),
        ("http://10.0.0.7:80/mlflow/", True),
        ("http://10.0.0.7/mlflow/team-a", True),
        ("http://169.254.169.254/latest/meta-data", False),  # cloud metadata
        ("http://127.0.0.1:6379", False),  # the server's own Redis
        ("https://mlflow.internal:5001", False),
        ("http://mlflow.internal:5000", False),  # the scheme is part of the origin
        ("https://mlflow.internal.attacker.example:5000", False),
        ("https://attacker.example/https://mlflow.internal:5000", False),
        ("http://10.0.0.7/mlflowx", False),  # a path prefix ends at a segment
        ("http://10.0.0.7/", False),
        # Dot segments climb out of the allowed path on the server (it or a proxy normalises them).
        ("http://10.0.0.7/mlflow/../admin", False),
        ("http://10.0.0.7/mlflow/%2e%2e/admin", False),
        ("http://10.0.0.7/mlflow/%2E%2e/%2e%2E/x", False),
        ("http://10.0.0.7/mlflow/./../x", False),
        ("http://10.0.0.7/mlflow/..%2fadmin", False),  # an encoded '/' hides a segment
        ("http://10.0.0.7/mlflow/a/..", False),
        ("http://10.0.0.7/mlflow/..;/admin", False),  # a path parameter: '..' to Tomcat-style proxies
        ("http://10.0.0.7/mlflow/..runs", True),  # a name that starts with dots is no dot segment
    ],
)
def test_a_job_names_only_mlflow_servers_the_operator_allows(
    tmp_path: Path, redis_url: str, uri: str, allowed: bool
) -> None:
    """The worker sends its MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN to whatever tracking_uri a job
    names, and reaches it from inside the operator's network: a tenant may name only a server on
    SPKD_MLFLOW_ALLOWED_URIS (or SPKD_MLFLOW_TRACKING_URI itself). Checked by the API and again by
    the worker (core.references.resolve_spec), so a job queued before the list changed is held
    to the list it runs under."""
    from fastapi.testclient import TestClient

    from spkd.app.main import create_app
    from spkd.common.errors import SpkdError
    from spkd.common.spec import JobSpec
    from spkd.core import references, store
    from tests.helpers import KEY_A, make_settings

    settings = make_settings(tmp_path, redis_url, mlflow_allowed_uris=ALLOWED_MLFLOW)
    small_imagefolder(Path(settings.data_root) / "hym", per_class=4)
    spec = tiny_spec({"path": "hym"}, integrations=[{"type": "mlflow", "tracking_uri": uri}])
    try:
        with TestClient(create_app(settings)) as client:
            client.headers["Authorization"] = f"Bearer {KEY_A}"
            resp = client.post("/v1/jobs", json=spec)
        if allowed:
            assert resp.status_code in (201, 202), resp.text
        else:
            assert resp.status_code == 422, resp.text
            err = resp.json()["error"]
            assert err["code"] == "tracking_uri_not_allowed", err
            assert err["field"] == "integrations.0.tracking_uri", err
            assert "SPKD_MLFLOW_ALLOWED_URIS" in err["message"], err
        # the worker's own check, on a server whose list no longer holds the URI
        strict = make_settings(tmp_path / "strict", redis_url)
        with pytest.raises(SpkdError, match="SPKD_MLFLOW_ALLOWED_URIS"):
            references.check_integrations(strict, JobSpec.model_validate(spec))
    finally:
        store.delete_prefix(store.connect(redis_url), settings.redis_prefix)


def test_the_servers_own_mlflow_uri_is_always_allowed(tmp_path: Path, redis_url: str) -> None:
    """A job may name the server's default MLflow server explicitly (credentials in the setting
    are not part of the match, and never echoed in an error)."""
    from spkd.common.errors import SpkdError
    from spkd.common.spec import JobSpec
    from spkd.core import references
    from tests.helpers import make_settings

    settings = make_settings(tmp_path, redis_url, mlflow_tracking_uri="https://ops:s3cret@mlflow.corp:8443")
    ok = tiny_spec(
        {"path": "hym"}, integrations=[{"type": "mlflow", "tracking_uri": "https://mlflow.corp:8443"}]
    )
    references.check_integrations(settings, JobSpec.model_validate(ok))
    references.check_integrations(settings, JobSpec.model_validate(tiny_spec({"path": "hym"})))
    bad = tiny_spec(
        {"path": "hym"}, integrations=[{"type": "mlflow", "tracking_uri": "https://evil.example"}]
    )
    with pytest.raises(SpkdError) as err:
        references.check_integrations(settings, JobSpec.model_validate(bad))
    assert "s3cret" not in str(err.value) and "https://mlflow.corp:8443" in str(err.value)
