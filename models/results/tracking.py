"""Follow a job in the tools teams already use: TensorBoard event files and an MLflow run.

The engine only knows the `Reporter` protocol, so tracking is a Reporter wrapper:
`TrackingReporter(inner, trackers)` forwards every call to the inner reporter (Redis, the CLI's
progress bar, a test recorder) and feeds the same events to each tracker. `run_tracked` is the
one call the worker and `spkd run` make instead of `run_valid`: it builds the trackers for a job,
runs it, and closes them with the job's outcome.

A tracker never fails a job: an exception inside one is reported once as a `warning` event and
that tracker is switched off for the rest of the run. Scalars are taken generically from the
numeric fields of `epoch_end` events (whatever the engine reports: loss terms, accuracies,
throughput), so a new field shows up without a change here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlsplit

from spkd.common import files
from spkd.common.reporter import Fenced, Progress, Reporter, StopRequested, ensure_current

log = logging.getLogger("spkd.tracking")

# epoch_end fields that locate a row rather than measure something
_NOT_SCALARS = frozenset({"stage", "epoch", "epochs"})
# per-step scalars: at most this many points per epoch (a long epoch is thinned, not flooded)
STEP_POINTS_PER_EPOCH = 50


class Tracker(Protocol):
    """One destination for a job's metrics. Exceptions raised here switch the tracker off."""

    name: str

    def start(self) -> None:
        """Called once before the job runs (connect, create the run)."""

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """Called after the inner reporter has logged the event."""

    def on_progress(self, progress: Progress) -> None:
        """Called every training step; implementations throttle themselves."""

    def close(self, status: str) -> None:
        """The run ended: status is FINISHED, FAILED or KILLED (cancelled)."""


def numeric_fields(data: dict[str, Any]) -> dict[str, float]:
    """The finite int/float values of an event's data, minus the row's coordinates (stage, epoch)."""
    out = {}
    for key, value in data.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret (and user:password@ in URLs) removed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


class TrackingReporter:
    """A Reporter that forwards to `inner` and feeds `trackers`; a failing tracker warns once."""

    def __init__(self, inner: Reporter, trackers: list[Tracker], secrets: Iterable[str] = ()) -> None:
        self.inner = inner
        self.trackers = list(trackers)
        self._secrets = [s for s in secrets if s]

    def event(self, kind: str, message: str, **data: Any) -> None:
        """Feed the trackers, then log the event. Trackers first, behind the fencing check: an
        observer who saw the event in the job's log also finds its scalars already written, and
        an attempt that lost the job writes no tracker file at all."""
        if self.trackers:
            ensure_current(self.inner)
            self._each(lambda t: t.on_event(kind, message, data))
        self.inner.event(kind, message, **data)

    def progress(self, progress: Progress) -> None:
        self.inner.progress(progress)
        self._each(lambda t: t.on_progress(progress))

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    def ensure_current(self) -> None:
        """The inner reporter's fencing check: a wrapper must never hide it (files would then be
        published by a run that lost the job)."""
        ensure_current(self.inner)

    def start(self) -> None:
        """Start every tracker; one that cannot start warns and is left out."""
        self._each(lambda t: t.start())

    def close(self, status: str) -> None:
        """End every tracker with the job's outcome (FINISHED, FAILED, KILLED).

        Raises Fenced (writing nothing) when this run no longer owns its job. A check that cannot
        be made (Redis unreachable) does not stop the close: no other attempt can take the job
        while Redis is down, and an MLflow run should not be left RUNNING."""
        try:
            ensure_current(self.inner)
        except Fenced:
            self.trackers = []
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("closing the trackers without a fencing check: %s", exc)
        self._each(lambda t: t.close(status))

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except StopRequested:
                raise
            except Exception as exc:  # noqa: BLE001 - a tracking outage must never fail the job
                self._disable(tracker, exc)

    def _disable(self, tracker: Tracker, exc: Exception) -> None:
        self.trackers.remove(tracker)
        reason = redact_text(f"{type(exc).__name__}: {exc}", self._secrets)[:500]
        log.warning("%s tracking switched off: %s", tracker.name, reason)
        self.inner.event(
            "warning",
            f"{tracker.name} tracking failed and is off for the rest of this job: {reason}",
            integration=tracker.name,
        )
        # release what it holds (files, a run left RUNNING); its own errors are moot now
        with contextlib.suppress(Exception):
            tracker.close("FAILED")


# --------------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker:
    """Event files under `<log_dir>/<stage>/` (x = epoch) and `<log_dir>/<stage>/steps/` (x = step).

    Per epoch: every numeric field of `epoch_end` under its own name (`train_loss`, `ce`, `sp`,
    `kd`, `selection_acc`, `selection_loss`, `images_per_sec`, ...: each accuracy and eval loss
    named by its split, docs/artifacts.md#names-every-number-names-its-split) plus `lr` (the last
    step's). Per step, thinned to STEP_POINTS_PER_EPOCH points an epoch: `loss` and `lr`. Numeric
    `stage_finished` fields go to `summary/<field>` at step 0 (`summary/selection_acc` for a
    training stage's chosen epoch, `summary/report_acc` for evaluate's shipped student,
    `summary/seconds`).

    Resume: a resumed stage reopens its writers with `purge_step` at the first epoch (step) it
    writes again, so TensorBoard hides what the dead process had logged past the checkpoint
    instead of drawing those points twice.

    Files are written only from `on_event` and `close`, which TrackingReporter calls behind the
    fencing check: step points wait in memory until the epoch ends. A writer holding queued
    scalars would let its flush thread write them when a frozen process thaws after another
    attempt took the job over.
    """

    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer_cls: Any = None
        self._epoch_writers: dict[str, Any] = {}
        self._step_writers: dict[str, Any] = {}
        self._lr: dict[str, float] = {}
        # stage -> [(step, {tag: value})] not yet written
        self._pending_steps: dict[str, list[tuple[int, dict[str, float]]]] = {}

    def start(self) -> None:
        # here, not at import: without the `tensorboard` package this is one warning event
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter

    def _writer(self, table: dict[str, Any], stage: str, sub: str, first_step: int | None):
        if stage not in table:
            path = self.log_dir / stage / sub if sub else self.log_dir / stage
            table[stage] = self._writer_cls(log_dir=str(path), purge_step=first_step, flush_secs=30)
        return table[stage]

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        stage = data.get("stage")
        if not isinstance(stage, str):
            return
        if kind == "epoch_end":
            self._write_steps(stage)
            epoch = int(data["epoch"])
            writer = self._writer(self._epoch_writers, stage, "", epoch)
            scalars = numeric_fields(data)
            if "lr" not in scalars and stage in self._lr:
                scalars["lr"] = self._lr[stage]
            for key, value in scalars.items():
                writer.add_scalar(key, value, epoch)
            writer.flush()
        elif kind == "stage_finished":
            self._write_steps(stage)
            scalars = numeric_fields(data)
            if scalars:
                # no purge_step: a stage resumed only to finish must not hide its epochs
                writer = self._writer(self._epoch_writers, stage, "", None)
                for key, value in scalars.items():
                    writer.add_scalar(f"summary/{key}", value, 0)
            self._close_stage(stage)

    def on_progress(self, p: Progress) -> None:
        lr = p.extra.get("lr")
        if isinstance(lr, int | float):
            self._lr[p.stage] = float(lr)
        every = max(1, p.steps // STEP_POINTS_PER_EPOCH)
        if p.step % every and p.step != p.steps:
            return
        point = {"loss": p.loss} if p.loss is not None and math.isfinite(p.loss) else {}
        if p.stage in self._lr:
            point["lr"] = self._lr[p.stage]
        self._pending_steps.setdefault(p.stage, []).append(((p.epoch - 1) * p.steps + p.step, point))

    def _write_steps(self, stage: str) -> None:
        points = self._pending_steps.pop(stage, [])
        if not points:
            return
        writer = self._writer(self._step_writers, stage, "steps", points[0][0])
        for step, point in points:
            for tag, value in point.items():
                writer.add_scalar(tag, value, step)
        writer.flush()

    def _close_stage(self, stage: str) -> None:
        for table in (self._epoch_writers, self._step_writers):
            writer = table.pop(stage, None)
            if writer is not None:
                writer.close()

    def close(self, status: str) -> None:
        for stage in list(self._pending_steps):  # a stopped or failed run's last partial epoch
            self._write_steps(stage)
        for stage in set(self._epoch_writers) | set(self._step_writers):
            self._close_stage(stage)


# -------------------------------------------------------------------------------------- MLflow
# The client's defaults retry a dead server for minutes and report usage to MLflow's own
# servers; a worker wants neither. A value the operator set in the environment wins.
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
PARAM_VALUE_MAX = 500  # well under MLflow's own limit; a long layer list is cut, not refused
# top-level results of metrics.json logged as final metrics (when numeric)
FINAL_RESULTS = ("teacher", "baseline", "distilled")
# output entries that are not results (resume state) or are already logged as metrics
SKIP_ARTIFACTS = frozenset({"checkpoints", "tensorboard"})


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys (`train.lr`), other values as strings (lists as JSON)."""
    import json

    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out |= flatten(sub, f"{prefix}{key}.")
        return out
    text = json.dumps(value) if isinstance(value, list | None) else str(value)
    return {prefix.rstrip("."): text[:PARAM_VALUE_MAX]}


class MlflowTracker:
    """One MLflow run per job, named by the job id and tagged `spkd.job_id`, teacher and student.

    start(): finds the job's run (a resumed job keeps its run) or creates it with the spec as
    params (flattened, `integrations` left out). Per `epoch_end`: every numeric field as
    `<stage>/<field>` at step = epoch, plus `<stage>/lr`. Per `stage_finished`: its numeric fields
    as `<stage>/final_<field>`. close("FINISHED"): the accuracies of metrics.json as
    `<model>_<field>` (`distilled_report_acc`, `baseline_select_acc`, ...) and `gain`, every output
    file and folder (model folders, weights, ONNX, metrics.json, report) as artifacts, then the
    run's end status.
    """

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, job_id: str, spec: dict[str, Any], out_dir: Path) -> None:
        self.uri, self.experiment, self.job_id = uri, experiment, re.sub(r"[^A-Za-z0-9_.\-]", "_", job_id)
        self.spec, self.out_dir = spec, Path(out_dir)
        self.client: Any = None
        self.run_id: str | None = None
        self._lr: dict[str, float] = {}

    def start(self) -> None:
        import os

        for key, value in MLFLOW_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        runs = self.client.search_runs(
            [exp_id], filter_string=f"tags.`spkd.job_id` = '{self.job_id}'", max_results=1
        )
        if runs:  # a resumed job goes on in its run
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {
            "spkd.job_id": self.job_id,
            "spkd.teacher": str(self.spec.get("teacher", {}).get("model", "")),
            "spkd.student": str(self.spec.get("student", {}).get("model", "")),
        }
        self.run_id = self.client.create_run(exp_id, run_name=self.job_id, tags=tags).info.run_id
        self._log_params()

    def _log_params(self) -> None:
        from mlflow.entities import Param

        spec = {k: v for k, v in self.spec.items() if k != "integrations"}
        params = [Param(k, v) for k, v in sorted(flatten(spec).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        stage = data.get("stage")
        if not isinstance(stage, str):
            return
        scalars = numeric_fields(data)
        if kind == "epoch_end":
            if "lr" not in scalars and stage in self._lr:
                scalars["lr"] = self._lr[stage]
            self._log_metrics({f"{stage}/{k}": v for k, v in scalars.items()}, int(data["epoch"]))
        elif kind == "stage_finished":
            self._log_metrics({f"{stage}/final_{k}": v for k, v in scalars.items()}, 0)

    def on_progress(self, p: Progress) -> None:
        lr = p.extra.get("lr")
        if isinstance(lr, int | float):
            self._lr[p.stage] = float(lr)

    def close(self, status: str) -> None:
        if self.client is None or self.run_id is None:
            return
        if status == "FINISHED":
            self._log_results()
            self._log_artifacts()
        self.client.set_terminated(self.run_id, status=status)

    def _log_results(self) -> None:
        import json

        path = self.out_dir / "metrics.json"
        if not path.is_file():
            return
        metrics = json.loads(path.read_text())
        final = {}
        for name in FINAL_RESULTS:
            block = metrics.get(name)
            if isinstance(block, dict):
                final |= {f"{name}_{k}": v for k, v in numeric_fields(block).items()}
        if isinstance(metrics.get("gain"), int | float):
            final["gain"] = float(metrics["gain"])
        self._log_metrics(final, 0)

    def _log_artifacts(self) -> None:
        for entry in sorted(self.out_dir.iterdir()):
            if entry.name in SKIP_ARTIFACTS or entry.name.startswith("."):
                continue
            if entry.is_dir():
                self.client.log_artifacts(self.run_id, str(entry), artifact_path=entry.name)
            elif entry.is_file():
                self.client.log_artifact(self.run_id, str(entry))


# ------------------------------------------------------------------------------ putting it on
def mlflow_targets(
    spec: Any, default_uri: str, default_experiment: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """[(tracking uri, experiment)] for the job, and warnings for entries that cannot log.

    The spec's `integrations: [{type: mlflow, ...}]` entries win (their tracking_uri defaulting to
    the setting); without any, the setting alone (`SPKD_MLFLOW_TRACKING_URI`) logs every job to
    `default_experiment`.
    """
    entries = [i for i in getattr(spec, "integrations", None) or [] if i.type == "mlflow"]
    if not entries:
        return ([(default_uri, default_experiment)] if default_uri else []), []
    targets, warnings = [], []
    for entry in entries:
        uri = entry.tracking_uri or default_uri
        if uri:
            targets.append((uri, entry.experiment or default_experiment))
        else:
            warnings.append(
                "an mlflow integration has no tracking_uri and the "
                "server sets no SPKD_MLFLOW_TRACKING_URI: not logging to MLflow"
            )
    return targets, warnings


def _secrets(uri: str) -> list[str]:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return [uri]
    return [s for s in (parts.password, parts.username and f"{parts.username}:{parts.password}") if s]


def run_tracked(
    valid: Any,
    out_dir: Path,
    reporter: Reporter,
    job_id: str,
    settings: Any = None,
    **kwargs: Any,
) -> Any:
    """`models.pipeline.run_valid` of a validated job (models.pipeline.ValidJob) with TensorBoard
    files in `<out_dir>/tensorboard/` and, when configured, an MLflow run; kwargs go to run_valid.

    `settings` (core.settings.Settings, read by attribute so the engine does not import the
    service) gives `mlflow_tracking_uri` and `mlflow_experiment`. Returns run_valid's
    models.pipeline.Finished, its manifest with the TensorBoard files added (closed by then); its
    exceptions (SpkdError, StopRequested, ...) pass through after the trackers are closed with
    the outcome (FAILED, KILLED).
    """
    from spkd.models.pipeline import run_valid

    spec = valid.spec
    out_dir = Path(out_dir)
    uri = getattr(settings, "mlflow_tracking_uri", "") or ""
    targets, warnings = mlflow_targets(spec, uri, getattr(settings, "mlflow_experiment", "spkd"))
    for warning in warnings:
        reporter.event("warning", warning, integration="mlflow")
    spec_dict = spec.model_dump(mode="json")
    trackers: list[Any] = [TensorBoardTracker(out_dir / "tensorboard")]
    trackers += [MlflowTracker(uri, exp, job_id, spec_dict, out_dir) for uri, exp in targets]
    tracked = TrackingReporter(reporter, trackers, secrets=[s for uri, _ in targets for s in _secrets(uri)])
    tracked.start()
    status = "FAILED"
    try:
        finished = run_valid(valid, out_dir, tracked, job_id=job_id, **kwargs)
        status = "FINISHED"
    except StopRequested:
        status = "KILLED"
        raise
    except Fenced:
        # Another attempt owns the job: this one writes nothing more, so the trackers are dropped
        # unflushed (closing would write the scalars a stale step queued into tensorboard/).
        status = "FENCED"
        raise
    finally:
        if status != "FENCED":
            tracked.close(status)
    board = files.manifest(out_dir / "tensorboard", "tensorboard/")  # complete once closed
    artifacts = sorted(finished.artifacts + board, key=lambda a: PurePosixPath(a["name"]).parts)
    return dataclasses.replace(finished, artifacts=artifacts)
