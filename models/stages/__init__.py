"""The stages of a job, in order (docs/architecture.md#a-stage).

`common.spec.STAGE_INFO` (torch-free: the API and the dashboard read it too) is the one list of
stages: names, order, when a job plans each and how many epochs it trains. This registry adds what
only the engine knows: each stage's body, a `run_stage(run) -> float | None` function (the accuracy
its `stage_finished` event reports, or None), and the weight files it leaves in the attempt's
checkpoint folder. A test checks that every stage of the list has its entry here, in order.
models/pipeline.py runs the planned ones in this order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from spkd.common.spec import STAGE_INFO, JobSpec, StageInfo
from spkd.models.stages import baseline, distill, evaluate, export, teacher
from spkd.models.training.run import Run


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


_INFO = {info.name: info for info in STAGE_INFO}


def _stage(
    name: str,
    body: Callable[[Run], float | None],
    produces: tuple[str, ...] = (),
    needs: tuple[str, ...] = (),
) -> Stage:
    """The registry entry of the stage `name` of common.spec.STAGE_INFO: its plan and epochs from
    there, its body and files from here."""
    info: StageInfo = _INFO[name]
    epochs = info.epochs if info.trains else None
    return Stage(name, planned=info.planned, body=body, epochs=epochs, produces=produces, needs=needs)


STAGES: tuple[Stage, ...] = (
    _stage(
        "teacher_finetune",
        teacher.run_stage,
        produces=("teacher.safetensors", "teacher_finetune.best.safetensors"),
    ),
    _stage("baseline", baseline.run_stage, produces=("baseline.safetensors", "baseline.best.safetensors")),
    _stage(
        "distill",
        distill.run_stage,
        produces=("distilled.safetensors", "distill.best.safetensors"),
        needs=("teacher.safetensors",),
    ),
    _stage(
        "evaluate",
        evaluate.run_stage,
        produces=("soup.safetensors",),
        needs=("distilled.safetensors", "baseline.safetensors", "teacher.safetensors"),
    ),
    _stage(
        "export",
        export.run_stage,
        needs=("distilled.safetensors", "baseline.safetensors", "teacher.safetensors", "soup.safetensors"),
    ),
)


def planned(spec: JobSpec) -> list[Stage]:
    """The stages this job runs, in order."""
    return [stage for stage in STAGES if stage.planned(spec)]
