"""The engine's entry points: validate a job, then run its planned stages in order.

Stages are declared once, in models/stages/ (docs/architecture.md#a-stage); this module is the
loop over them: skip what a resumed run finished, report each stage, checkpoint after each.
A run resumes from its last checkpoint (models/training/run.py, models/training/checkpoint.py:
out_dir/checkpoints/; the service gives each attempt its own out_dir). Each model is built once per
job (models/networks/bank.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.reporter import Reporter, StopRequested
from common.spec import JobSpec
from models import stages
from models.networks.bank import BANK
from models.stages.common import best_row
from models.stages.search import search_rungs
from models.training import distributed, ranks
from models.training.run import Run, cleanup_checkpoints, open_run
from models.training.validation import validate_job

__all__ = ["best_row", "run_job", "search_rungs", "validate_job"]


def run_job(
    spec: JobSpec,
    data_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: str | None = None,
    data_path: str = "auto",
    job_id: str | None = None,
) -> dict:
    """Run (or resume) the job; returns the metrics dict also written to out_dir/metrics.json.

    A run resumes from out_dir/checkpoints/last.pt when there is one (a service job gives each
    attempt its own out_dir, seeded from the previous attempt: core/attempts.py). `data_path`:
    `auto` decodes a dataset that fits into memory once,
    `loader` always streams with a DataLoader (SPKD_DATA_PATH for the service). Raises whatever the
    reporter raises (StopRequested, Fenced) unchanged. `job_id`: the service's id of the job, kept
    in metrics.json's `job` block (the report's header); None for a job run in process.
    """
    out_dir = Path(out_dir)
    if spec.train.devices > 1 and distributed.active() is None:  # this process becomes rank 0
        return ranks.run_ranks(run_job, spec, Path(data_dir), out_dir, reporter, device, data_path, job_id)
    try:
        for warning in validate_job(spec, data_dir):
            reporter.event("warning", warning)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = stages.planned(spec)
        epochs = {s.name: s.epochs(spec) for s in plan if s.epochs is not None}
        run = open_run(spec, Path(data_dir), out_dir, reporter, device, epochs, data_path, job_id)
        if not ranks.leader():  # ranks 1..N-1 only train: rank 0 alone evaluates and exports
            plan = plan[: max(i for i, s in enumerate(plan) if s.epochs is not None) + 1]
        for stage in plan:
            if stage.name not in run.state.completed:
                _run_stage(run, stage)
        if not ranks.leader():
            return {}
        cleanup_checkpoints(run, [name for s in stages.STAGES for name in s.produces])
    finally:
        BANK.clear()  # the job's models: a job process runs one job
    return json.loads((out_dir / "metrics.json").read_text())


def _run_stage(run: Run, stage: stages.Stage) -> None:
    """Run one stage between its `stage_started` and `stage_finished` events, then checkpoint."""
    if run.reporter.should_stop():  # evaluate and export have no training steps that check it
        raise StopRequested(f"stopped before {stage.name}")
    name = stage.name
    run.reporter.event("stage_started", f"{name} started", stage=name)
    start = time.perf_counter()
    val_acc = stage.body(run)  # training stages: the best epoch's selection accuracy
    seconds = run.state.timing.get(name, 0.0) if stage.trains else time.perf_counter() - start
    run.state.timing[name] = round(seconds, 3)
    run.state.completed.append(name)
    run.state.current = None
    run.save()
    finished = {"stage": name, "seconds": round(seconds, 3)}
    if val_acc is not None:
        finished["val_acc"] = val_acc
        finished["eval_split"] = run.data.choice_split if stage.trains else "report"
    run.reporter.event("stage_finished", f"{name} finished in {seconds:.1f}s", **finished)
    if run.runtime.is_cuda:
        torch.cuda.empty_cache()
