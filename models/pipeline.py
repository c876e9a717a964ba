"""The engine's entry points: validate a job (`validate_job`), then run its planned stages in
order (`run_valid`; `run_job` does both).

Stages are declared once, in models/stages/ (docs/architecture.md#a-stage); this module is the
loop over them: skip what a resumed run finished, report each stage, checkpoint after each.
A run resumes from its last checkpoint (models/training/run.py, models/training/checkpoint.py:
out_dir/checkpoints/; the service gives each attempt its own out_dir). Each model is built once per
job (models/networks/bank.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spkd.common.metric_names import split_key
from spkd.common.reporter import Reporter, StopRequested
from spkd.common.spec import JobSpec
from spkd.models import stages
from spkd.models.stages.common import best_row
from spkd.models.stages.search import search_rungs
from spkd.models.training import distributed, ranks
from spkd.models.training.run import Run, cleanup_checkpoints, open_run
from spkd.models.training.validation import ValidJob, validate_job

__all__ = ["Finished", "ValidJob", "best_row", "run_job", "run_valid", "search_rungs", "validate_job"]


def run_job(
    spec: JobSpec,
    data_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: str | None = None,
    data_path: str = "auto",
    job_id: str | None = None,
) -> dict:
    """`validate_job`, then `run_valid`; returns the metrics dict. For callers with no step of
    their own between the two (tests, benches). Raises what either raises."""
    valid = validate_job(spec, data_dir)
    return run_valid(valid, out_dir, reporter, device, data_path, job_id).metrics


@dataclass
class Finished:
    """What a finished run leaves: metrics.json's dict, and the manifest of the files it published
    ({"name" relative to out_dir, "size" in bytes, "sha256"}; checkpoints are not results)."""

    metrics: dict[str, Any]
    artifacts: list[dict[str, Any]]


def run_valid(
    valid: ValidJob,
    out_dir: Path,
    reporter: Reporter,
    device: str | None = None,
    data_path: str = "auto",
    job_id: str | None = None,
) -> Finished:
    """Run (or resume) a validated job; returns its metrics (out_dir/metrics.json) and the manifest
    of the files it published, which a service registers as the job's artifacts.

    Its validation warnings become `warning` events first. A run resumes from
    out_dir/checkpoints/last.pt when there is one (a service job gives each attempt its own
    out_dir, seeded from the previous attempt: core/attempts.py). `data_path`: `auto` decodes a
    dataset that fits into memory once, `loader` always streams with a DataLoader (SPKD_DATA_PATH
    for the service). Raises whatever the reporter raises (StopRequested, Fenced) unchanged.
    `job_id`: the service's id of the job, kept in metrics.json's `job` block (the report's
    header); None for a job run in process.
    """
    out_dir = Path(out_dir)
    spec = valid.spec
    if spec.train.devices > 1 and distributed.active() is None:  # this process becomes rank 0
        return ranks.run_ranks(
            lambda dev: run_valid(valid, out_dir, reporter, dev, data_path, job_id),
            spec,
            valid.data_dir,
            out_dir,
            reporter,
            device,
            data_path,
        )
    try:
        for warning in valid.warnings:
            reporter.event("warning", warning)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = stages.planned(spec)
        epochs = {s.name: s.epochs(spec) for s in plan if s.epochs is not None}
        run = open_run(valid, out_dir, reporter, device, epochs, data_path, job_id)
        if not ranks.leader():  # ranks 1..N-1 only train: rank 0 alone evaluates and exports
            plan = plan[: max(i for i, s in enumerate(plan) if s.epochs is not None) + 1]
        for stage in plan:
            if stage.name not in run.state.completed:
                _run_stage(run, stage)
        if not ranks.leader():
            return Finished({}, [])
        cleanup_checkpoints(run, [name for s in stages.STAGES for name in s.produces])
    finally:
        valid.models.clear()  # the job's models: its memory goes back now, not with the ValidJob
    return Finished(json.loads((out_dir / "metrics.json").read_text()), list(run.state.artifacts))


def _run_stage(run: Run, stage: stages.Stage) -> None:
    """Run one stage between its `stage_started` and `stage_finished` events, then checkpoint."""
    if run.reporter.should_stop():  # evaluate and export have no training steps that check it
        raise StopRequested(f"stopped before {stage.name}")
    name = stage.name
    run.reporter.event("stage_started", f"{name} started", stage=name)
    start = time.perf_counter()
    acc = stage.body(run)  # training stages: the best epoch's selection accuracy; evaluate: report
    seconds = run.state.timing.get(name, 0.0) if stage.trains else time.perf_counter() - start
    run.state.timing[name] = round(seconds, 3)
    run.state.completed.append(name)
    run.state.current = None
    run.save()
    finished = {"stage": name, "seconds": round(seconds, 3)}
    if acc is not None:
        split = run.data.choice_split if stage.trains else "report"
        finished[split_key(split, "acc")] = acc
        finished["eval_split"] = split
    run.reporter.event("stage_finished", f"{name} finished in {seconds:.1f}s", **finished)
    if run.runtime.is_cuda:
        torch.cuda.empty_cache()
