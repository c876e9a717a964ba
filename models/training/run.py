"""A run's state: what survives a restart (`RunState`, saved as last.pt by
models/training/checkpoint.py), and what one process holds while it runs a job (`Run`).

Publishing: every file a run leaves is written to a temporary name first and moved into place
only after `Run.guard()` (the service's fencing check) passes, right before the rename.
Checkpoints and stage weights go to out_dir/checkpoints/ (checkpoint.checkpoint_dir).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spkd.common.errors import SpkdError
from spkd.common.reporter import Reporter, ensure_current
from spkd.common.spec import JobSpec
from spkd.models.data import evidence, loader
from spkd.models.data.batches import JobData, open_data
from spkd.models.networks.bank import ModelBank
from spkd.models.results import export
from spkd.models.training import checkpoint, validation
from spkd.models.training.engine import Clock, Runtime, pick_runtime

FORMAT_VERSION = 1


@dataclass
class RunState:
    """What survives a restart: finished stages, their results, and the stage in progress."""

    spec: str
    completed: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    current: dict[str, Any] | None = None
    # what the export stage published: {"name", "size", "sha256"} per file (common.files.manifest)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "spec": self.spec,
            "completed": self.completed,
            "results": self.results,
            "curves": self.curves,
            "timing": self.timing,
            "current": self.current,
            "artifacts": self.artifacts,
        }


@dataclass
class Run:
    spec: JobSpec
    scan: loader.DatasetScan
    out_dir: Path
    reporter: Reporter
    runtime: Runtime
    state: RunState
    data: JobData
    clock: Clock
    models: ModelBank  # the job's built teacher and student (validation built them)
    kept: dict[str, Any] = field(default_factory=dict)  # finished models evaluate and export share
    job_id: str | None = None  # the service's job id (metrics.json `job`), None in process

    @property
    def num_classes(self) -> int:
        return len(self.scan.classes)

    @property
    def selecting(self) -> bool:
        return self.data.selecting

    def guard(self) -> None:
        """Raise Fenced unless this run may still write (called right before each rename)."""
        ensure_current(self.reporter)

    def save(self) -> None:
        checkpoint.save(self.out_dir, self.state.payload(), self.guard)

    def ckpt_file(self, name: str) -> Path:
        return checkpoint.checkpoint_dir(self.out_dir) / name

    def save_stage_weights(self, model: torch.nn.Module, name: str) -> None:
        export.save_weights(model, self.ckpt_file(name), self.guard)

    @property
    def staging_dir(self) -> Path:
        """Where the export stage writes the artifacts before they are published into out_dir."""
        return checkpoint.checkpoint_dir(self.out_dir) / "export"


def open_run(
    valid: validation.ValidJob,
    out_dir: Path,
    reporter: Reporter,
    device: str | None,
    epochs: dict[str, int],
    data_path: str = "auto",
    job_id: str | None = None,
) -> Run:
    """Split the validated job's scan into its roles, report the dataset, pick the device, open
    the data, adopt/load the checkpoint.

    `epochs`: the planned training stages' epochs (the whole-run ETA counts those not done yet).
    """
    spec = valid.spec
    scan = loader.with_selection(valid.scan, spec.dataset.selection_fraction, spec.train.seed)
    scan = loader.with_ship_part(scan, spec.dataset.ship_fraction, spec.train.seed)
    if spec.distill.searching and not scan.selection:
        field = "sp_weight" if isinstance(spec.distill.sp_weight, list) else "kd_weight"
        raise SpkdError(
            "search_needs_selection",
            f"a list of {field} candidates is judged on a selection split: set dataset.selection_fraction "
            "above 0 (or give the dataset a test/ split, so val/ selects)",
            f"distill.{field}",
        )
    _report_dataset(scan, reporter)
    if note := evidence.thin_selection(scan, spec.dataset.selection_fraction):
        reporter.event("warning", note, sizes=scan.sizes(), counts=scan.counts().get("selection"))
    runtime = pick_runtime(spec.train.precision, device)
    if note := validation.precision_note(spec.train.precision, runtime.amp_dtype, runtime.device):
        reporter.event("warning", note, requested=spec.train.precision, device=str(runtime.device))
    job_data = open_data(spec, scan, valid.models, runtime, reporter, data_path)
    state = load_state(spec, out_dir, reporter)
    steps = job_data.steps_per_epoch
    clock = Clock(total_steps=sum(e * steps for s, e in epochs.items() if s not in state.completed))
    return Run(spec, scan, out_dir, reporter, runtime, state, job_data, clock, valid.models, job_id=job_id)


def _report_dataset(scan: loader.DatasetScan, reporter: Reporter) -> None:
    summary = scan.summary()
    sizes, roles = summary["sizes"], summary["roles"]
    reporter.event(
        "dataset",
        f"{len(scan.classes)} classes, {sizes['train']} train / {sizes['selection']} selection "
        f"({roles['selection']}) / {sizes['report']} report ({roles['report']}) images, "
        f"{len(scan.rejected)} rejected",
        classes=summary["classes"],
        counts=summary["counts"],
        rejected=summary["rejected"],
        sizes=sizes,
        roles=roles,
    )


def _spec_key(spec: JobSpec) -> str:
    """The spec a checkpoint belongs to, less how many devices trained it (a job resumes on
    another device count: the state is the same)."""
    body = spec.model_dump(mode="json")
    for name in ("devices", "sync_batchnorm"):
        body["train"].pop(name, None)
    return json.dumps(body, sort_keys=True)


def load_state(spec: JobSpec, out_dir: Path, reporter: Reporter) -> RunState:
    """The run's saved state for this very spec, else a new one (another spec: a warning)."""
    saved = checkpoint.load(out_dir)
    key = _spec_key(spec)
    if saved is None:
        return RunState(spec=key)
    if saved.get("version") != FORMAT_VERSION or saved.get("spec") != key:
        reporter.event(
            "warning", "a checkpoint for another job spec was found in the output folder; starting over"
        )
        return RunState(spec=key)
    state = RunState(
        spec=key,
        completed=list(saved["completed"]),
        results=dict(saved["results"]),
        curves=dict(saved["curves"]),
        timing=dict(saved["timing"]),
        current=saved["current"],
        artifacts=list(saved.get("artifacts", [])),  # absent in checkpoints saved before export
    )
    where = state.current and f"{state.current['stage']} epoch {state.current['epoch']}"
    reporter.event(
        "info",
        f"resuming from checkpoint ({where or 'after ' + ', '.join(state.completed)})",
        completed=state.completed,
    )
    return state


def cleanup_checkpoints(run: Run, files: list[str]) -> None:
    """After success keep only the small state file (a rerun returns at once); drop the stages'
    weight `files`."""
    run.guard()
    shutil.rmtree(run.staging_dir, ignore_errors=True)
    for name in files:
        path = run.ckpt_file(name)
        if path.exists():
            path.unlink()
