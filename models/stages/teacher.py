"""teacher_finetune: fine-tune the teacher on the job's data (cross-entropy), keep its best epoch;
`teacher.finetune.epochs: auto` stops once the selection accuracy has stalled for `patience` epochs
(without a selection split, auto trains all `max_epochs`)."""

from __future__ import annotations

from spkd.models.stages.common import build_teacher, plain, train
from spkd.models.training.run import Run


def run_stage(run: Run) -> float | None:
    """Train the teacher; saves checkpoints/teacher.safetensors; returns its selection accuracy."""
    teacher, _ = build_teacher(run)
    ft = run.spec.teacher.finetune
    patience = ft.patience if ft.epochs == "auto" and run.selecting else None  # auto: early stopping
    lr = ft.lr or run.spec.train.lr
    chosen = train(
        run, "teacher_finetune", teacher, plain(teacher), ft.planned_epochs, lr, patience, ft.body_lr_scale
    )
    run.save_stage_weights(teacher, "teacher.safetensors")
    run.state.results["teacher"] = chosen
    return chosen["select_acc"]
