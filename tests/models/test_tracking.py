"""TensorBoard files and an MLflow run for every job.

A tiny real job runs through the worker's own entry point (workers.runner.execute_job, real
Redis) with SPKD_MLFLOW_TRACKING_URI pointing at a real `mlflow server` process on loopback
(its own sqlite store and artifact folder in a temp dir). The TensorBoard files are read back
with tensorboard's EventAccumulator, the MLflow run with the MLflow client, and both are compared
with the job's metrics.json. A server that is down must not fail a job, nor leak credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from spkd.common.reporter import RecordingReporter, StopRequested
from spkd.common.spec import JobSpec
from spkd.core import store
from spkd.models.pipeline import validate_job
from spkd.models.results.tracking import run_tracked
from spkd.workers import runner
from tests.helpers import make_settings, output_dir, tiny_job_spec

pytestmark = pytest.mark.slow

NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and served artifacts in a temp dir."""
    import httpx

    exe = Path(sys.executable).parent / "mlflow"
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **NO_TELEMETRY},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def _run_in_worker(tmp: Path, redis_url: str, dataset: Path, spec: JobSpec, **settings_over):
    """Queue the job in a fresh key prefix and run it with the worker's own execute_job."""
    settings = make_settings(tmp, redis_url, **settings_over)
    shutil.copytree(dataset, settings.data_root / "colors")
    r, keys = store.connect(redis_url), store.Keys(settings.redis_prefix)
    job_id = store.create_job(r, keys, "owner", spec.model_dump(mode="json"))["id"]
    outcome = runner.execute_job(r, keys, settings, job_id, "w")
    job = store.get_job(r, keys, job_id)
    job["artifacts"] = store.list_artifacts(r, keys, job_id)  # what the API lists for download
    events = store.list_events(r, keys, job_id)
    store.delete_prefix(r, settings.redis_prefix)
    return outcome, job, events, output_dir(settings, job)


@pytest.fixture(scope="module")
def tracked_job(mlflow_server, color_dataset, tmp_path_factory, redis_url):
    """One tiny job through the worker, with SPKD_MLFLOW_TRACKING_URI set."""
    tmp = tmp_path_factory.mktemp("tracked")
    spec = tiny_job_spec(integrations=[{"type": "mlflow", "experiment": "spkd-tests"}])
    outcome, job, events, out = _run_in_worker(
        tmp, redis_url, color_dataset, spec, mlflow_tracking_uri=mlflow_server
    )
    assert outcome == "succeeded", job.get("error")
    return job, events, out


def _accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _series(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ----------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_match_metrics_curves(tracked_job):
    job, _, out = tracked_job
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["curves"]) == {"teacher_finetune", "baseline", "distill"}
    for stage, curve in metrics["curves"].items():
        acc = _accumulator(out / "tensorboard" / stage)
        tags = set(acc.Tags()["scalars"])
        numeric = {
            k for k, v in curve[0].items() if isinstance(v, float | int) and k not in ("epoch", "epochs")
        }
        assert numeric <= tags, f"{stage}: {numeric - tags} missing"
        # every accuracy and eval loss names its split: the epochs' selection split, no old `val_*`
        assert {"lr", "selection_acc", "selection_loss", "summary/selection_acc", "summary/seconds"} <= tags
        assert not {t for t in tags if "val_" in t}, tags
        for key in numeric:
            got = _series(acc, key)
            assert [s for s, _ in got] == [row["epoch"] for row in curve]
            assert [v for _, v in got] == pytest.approx([row[key] for row in curve], rel=1e-6)
        steps = _accumulator(out / "tensorboard" / stage / "steps")
        losses = _series(steps, "loss")
        # train images (48 less the selection split) at batch 16, every step kept (fewer than 50 an epoch)
        per_epoch = metrics["protocol"]["sizes"]["train"] // 16
        assert [s for s, _ in losses] == list(range(1, per_epoch * len(curve) + 1))
        assert all(v > 0 for _, v in losses)
    # evaluate scores the shipped student on the report split, and its summary tag says so
    evaluate = _accumulator(out / "tensorboard" / "evaluate")
    [(_, shipped_acc)] = _series(evaluate, "summary/report_acc")
    assert shipped_acc == pytest.approx(metrics[metrics["shipped"]]["report_acc"])
    # the event files are registered job artifacts (downloadable like any result)
    tb = [a["name"] for a in job["artifacts"] if a["name"].startswith("tensorboard/")]
    assert any(n.startswith("tensorboard/distill/events.out.tfevents.") for n in tb)
    assert any(n.startswith("tensorboard/distill/steps/events.out.tfevents.") for n in tb)


def test_tensorboard_resume_does_not_draw_steps_twice(color_dataset, tmp_path):
    """Stopped in baseline epoch 2 then resumed: each step and epoch appears once, and the
    scalars are the final run's (metrics.json)."""
    spec = tiny_job_spec()
    # 44 training images (4 go to the selection split) at batch 16: 2 steps an epoch. Teacher 1
    # epoch + baseline epoch 1 + 1 step of epoch 2, then stop.
    with pytest.raises(StopRequested):
        stopping = RecordingReporter(stop_after_steps=5)
        run_tracked(validate_job(spec, color_dataset), tmp_path, stopping, "job_resume")
    assert len(list((tmp_path / "tensorboard" / "baseline" / "steps").glob("events.*"))) == 1
    metrics = run_tracked(
        validate_job(spec, color_dataset), tmp_path, RecordingReporter(), "job_resume"
    ).metrics
    assert metrics["job"]["id"] == "job_resume"  # the service's job id reaches the report's header
    # a second file in each resumed folder: the resumed process's, starting with a purge
    assert len(list((tmp_path / "tensorboard" / "baseline" / "steps").glob("events.*"))) == 2
    steps = _series(_accumulator(tmp_path / "tensorboard" / "baseline" / "steps"), "loss")
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    epochs = _series(_accumulator(tmp_path / "tensorboard" / "baseline"), "selection_acc")
    assert epochs == [
        (row["epoch"], pytest.approx(row["selection_acc"])) for row in metrics["curves"]["baseline"]
    ]


# ---------------------------------------------------------------------------------------- MLflow
def _client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def test_mlflow_run_has_params_metrics_and_artifacts(tracked_job, mlflow_server, tmp_path):
    job, events, out = tracked_job
    metrics = json.loads((out / "metrics.json").read_text())
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name("spkd-tests")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`spkd.job_id` = '{job['id']}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == job["id"] and run.info.status == "FINISHED"
    assert run.data.tags["spkd.teacher"] == "test_resnet"
    assert run.data.tags["spkd.student"] == "test_efficientnet"
    params = run.data.params
    assert params["teacher.model"] == "test_resnet" and params["train.lr"] == "0.05"
    assert params["distill.sp_weight"] == "auto" and params["train.epochs"] == "2"  # the spec's defaults
    assert not any(k.startswith("integrations") for k in params)
    for stage, curve in metrics["curves"].items():
        for key in ("train_loss", "selection_acc", "images_per_sec", *(["sp"] if stage == "distill" else [])):
            history = client.get_metric_history(run.info.run_id, f"{stage}/{key}")
            got = sorted((m.step, m.value) for m in history)
            assert got == [(row["epoch"], pytest.approx(row[key])) for row in curve]
        assert client.get_metric_history(run.info.run_id, f"{stage}/lr")
    assert run.data.metrics["distilled_report_acc"] == pytest.approx(metrics["distilled"]["report_acc"])
    assert not {k for k in run.data.metrics if "val_" in k}, run.data.metrics
    assert run.data.metrics["gain"] == pytest.approx(metrics["gain"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "student.onnx"} <= names and not [n for n in names if n.endswith(".safetensors")]
    assert {"student", "teacher"} <= names  # the model folders in timm's hub layout
    assert not names & {"checkpoints", "tensorboard"}
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert Path(local).read_bytes() == (out / "metrics.json").read_bytes()
    assert not [e for e in events if e["kind"] == "warning" and "mlflow" in e["message"]]


def test_mlflow_down_never_fails_the_job_nor_leaks_credentials(color_dataset, tmp_path, redis_url, caplog):
    """A closed port, with a password in the tracking URI: the job succeeds, one warning event
    says MLflow is off, and the password is in no event and no log line."""
    caplog.set_level(logging.DEBUG)
    url = f"http://spkd:s3cr3t-pw@127.0.0.1:{free_port()}"
    spec = tiny_job_spec(train={"epochs": 1}, baseline=False)
    outcome, job, events, out = _run_in_worker(
        tmp_path, redis_url, color_dataset, spec, mlflow_tracking_uri=url
    )
    assert outcome == "succeeded", job.get("error")
    warnings = [e for e in events if e["kind"] == "warning" and e["data"].get("integration") == "mlflow"]
    assert len(warnings) == 1, [e["message"] for e in events]
    assert "mlflow tracking failed" in warnings[0]["message"]
    assert "s3cr3t-pw" not in json.dumps(events) + json.dumps(job)
    assert "s3cr3t-pw" not in caplog.text
    assert (out / "tensorboard" / "distill").is_dir()  # the other tracker carried on


# ------------------------------------------------------------------------------------------ spec
@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"type": "mlflow", "tracking_uri": "http://u:p@mlflow.example:5000"}, "credentials"),
        ({"type": "mlflow", "tracking_uri": "file:///etc"}, "http"),
        ({"type": "mlflow", "tracking_uri": "sqlite:///x.db"}, "http"),
        ({"type": "mlflow", "experiment": ""}, "at least 1"),
        ({"type": "mlflow", "experiment": "x" * 201}, "at most 200"),
        ({"type": "mlflow", "tracking_uri": "http://h/" + "a" * 2000}, "at most 2000"),
        ({"type": "wandb"}, "mlflow"),
        ({"type": "mlflow", "exp": "typo"}, "Extra inputs"),
    ],
)
def test_integration_spec_is_bounded(entry, needle):
    with pytest.raises(ValidationError) as err:
        tiny_job_spec(integrations=[entry])
    assert needle in str(err.value)


def test_integration_spec_accepts_mlflow_and_caps_the_list():
    spec = tiny_job_spec(
        integrations=[{"type": "mlflow", "experiment": "e", "tracking_uri": "https://m:5000"}]
    )
    assert spec.integrations[0].experiment == "e"
    assert tiny_job_spec().integrations == []
    with pytest.raises(ValidationError, match="at most 4"):
        tiny_job_spec(integrations=[{"type": "mlflow"}] * 5)


def test_the_tracking_wrapper_keeps_the_fencing_check() -> None:
    """The worker wraps its fenced reporter in TrackingReporter: the engine's pre-publish check
    must still reach the inner reporter, or a run that lost its job would publish files."""
    from spkd.common.reporter import Fenced, ensure_current
    from spkd.models.results.tracking import TrackingReporter

    class StaleReporter(RecordingReporter):
        def ensure_current(self) -> None:
            raise Fenced("job_x: a newer attempt holds the job")

    with pytest.raises(Fenced):
        ensure_current(TrackingReporter(StaleReporter(), []))
    ensure_current(TrackingReporter(RecordingReporter(), []))  # no hook: the run may write


def _files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_tracker_files_are_written_only_at_fenced_points(tmp_path) -> None:
    """A job process frozen past its lease and thawed after another attempt took the job must add
    nothing to tensorboard/: step points wait in memory (no writer thread can flush them on a
    thaw), and every write is preceded by the fencing check, before the event reaches Redis (so
    an observer who saw an epoch_end saw its scalars already on disk)."""
    from spkd.common.reporter import Fenced, Progress
    from spkd.models.results.tracking import TensorBoardTracker, TrackingReporter

    class LosesTheJob(RecordingReporter):
        stale = False

        def ensure_current(self) -> None:
            if self.stale:
                raise Fenced("job_x: a newer attempt holds the job")

    inner, log_dir = LosesTheJob(), tmp_path / "tensorboard"
    tracked = TrackingReporter(inner, [TensorBoardTracker(log_dir)])
    tracked.start()

    def step(epoch: int, i: int) -> Progress:
        return Progress("baseline", epoch, 2, i, 2, 10.0, None, loss=0.5, extra={"lr": 0.1})

    def epoch_end(epoch: int) -> None:
        tracked.event(
            "epoch_end", f"epoch {epoch}", stage="baseline", epoch=epoch, epochs=2, selection_acc=0.5
        )

    tracked.progress(step(1, 1))
    tracked.progress(step(1, 2))
    assert _files(tmp_path) == {}, "a training step wrote to disk outside a fenced point"
    epoch_end(1)
    written = _files(tmp_path)
    assert any(n.startswith("tensorboard/baseline/steps/events.") for n in written), written
    assert any(n.startswith("tensorboard/baseline/events.") for n in written), written

    tracked.progress(step(2, 1))
    inner.stale = True  # frozen here; another worker takes the job; thawed
    tracked.progress(step(2, 2))
    with pytest.raises(Fenced):
        epoch_end(2)
    with pytest.raises(Fenced):
        tracked.close("FAILED")
    time.sleep(0.2)  # room for any writer thread to flush what it was handed
    assert _files(tmp_path) == written
    assert [e[2]["epoch"] for e in inner.events if e[0] == "epoch_end"] == [1]
    steps = _series(_accumulator(log_dir / "baseline" / "steps"), "loss")
    assert [s for s, _ in steps] == [1, 2]


def test_the_manifest_is_every_published_file(color_dataset, tmp_path):
    """The engine's manifest (what the service registers) is exactly the files left in out_dir
    but checkpoints/ and hidden temporaries, TensorBoard's included, with their sizes and sha256."""
    finished = run_tracked(validate_job(tiny_job_spec(), color_dataset), tmp_path, RecordingReporter(), "m")
    on_disk = {}
    for path in tmp_path.rglob("*"):
        rel = path.relative_to(tmp_path).as_posix()
        if path.is_file() and not rel.startswith("checkpoints/") and not path.name.startswith("."):
            on_disk[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    assert {a["name"]: (a["size"], a["sha256"]) for a in finished.artifacts} == on_disk
    assert "metrics.json" in on_disk and any(name.startswith("tensorboard/") for name in on_disk)
