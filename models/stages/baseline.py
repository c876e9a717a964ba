"""baseline: the student fine-tuned alone (cross-entropy), the comparison run of a distillation job."""

from __future__ import annotations

from spkd.models.stages.common import build_student, plain, train
from spkd.models.training.run import Run


def run_stage(run: Run) -> float | None:
    """Train the student alone; saves checkpoints/baseline.safetensors; returns its selection accuracy."""
    student = build_student(run)
    chosen = train(run, "baseline", student, plain(student), run.spec.train.epochs, run.spec.train.lr)
    run.save_stage_weights(student, "baseline.safetensors")
    run.state.results["baseline"] = chosen
    return chosen["select_acc"]
