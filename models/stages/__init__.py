"""The stages of a job, declared once, in order (docs/architecture.md#a-stage).

Each stage is one module with a `run_stage(run) -> float | None` body (the accuracy its
`stage_finished` event reports, or None) and one `Stage` entry below saying when a job plans it,
how many epochs it trains, and which weight files it leaves in the attempt's checkpoint folder.
`common.spec.STAGES` (torch-free, for the API) lists the same names in the same order; a test
compares them. models/pipeline.py runs the planned ones in this order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.spec import JobSpec
from models.stages import baseline, distill, evaluate, export, teacher
from models.training.run import Run


@dataclass(frozen=True)
class Stage:
    """One step of a job; `epochs` is None for a stage without training steps."""

    name: str  # the `stage` of events and of the job record; one of common.spec.STAGES
    planned: Callable[[JobSpec], bool]  # does this job run it?
    body: Callable[[Run], float | None]  # the stage's work; returns the accuracy to report, or None
    epochs: Callable[[JobSpec], int] | None = None  # training stages: epochs (the whole-run ETA)
    produces: tuple[str, ...] = ()  # weight files it leaves in the checkpoint folder (dropped at the end)
    needs: tuple[str, ...] = ()  # weight files of earlier stages it reads when they were planned

    @property
    def trains(self) -> bool:
        """A training stage: its time is the sum of its epochs and it reports a selection accuracy."""
        return self.epochs is not None


def _always(_spec: JobSpec) -> bool:
    return True


STAGES: tuple[Stage, ...] = (
    Stage(
        "teacher_finetune",
        planned=lambda spec: spec.teacher.finetune is not None,
        body=teacher.run_stage,
        epochs=lambda spec: spec.teacher.finetune.planned_epochs,
        produces=("teacher.safetensors", "teacher_finetune.best.safetensors"),
    ),
    Stage(
        "baseline",
        planned=lambda spec: bool(spec.baseline),
        body=baseline.run_stage,
        epochs=lambda spec: spec.train.epochs,
        produces=("baseline.safetensors", "baseline.best.safetensors"),
    ),
    Stage(
        "distill",
        planned=_always,
        body=distill.run_stage,
        epochs=lambda spec: spec.train.epochs,
        produces=("distilled.safetensors", "distill.best.safetensors"),
        needs=("teacher.safetensors",),
    ),
    Stage(
        "evaluate",
        planned=_always,
        body=evaluate.run_stage,
        produces=("soup.safetensors",),
        needs=("distilled.safetensors", "baseline.safetensors", "teacher.safetensors"),
    ),
    Stage(
        "export",
        planned=_always,
        body=export.run_stage,
        needs=("distilled.safetensors", "baseline.safetensors", "teacher.safetensors", "soup.safetensors"),
    ),
)


def planned(spec: JobSpec) -> list[Stage]:
    """The stages this job runs, in order."""
    return [stage for stage in STAGES if stage.planned(spec)]
