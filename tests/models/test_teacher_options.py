"""The teacher's options: `teacher.finetune.epochs: auto` (early stopping on the selection split,
the best epoch kept) and a number honoured as before."""

from __future__ import annotations

import pydantic
import pytest

from spkd.common.reporter import RecordingReporter
from spkd.models import stages
from spkd.models.pipeline import run_job
from spkd.models.stages.common import best_row, stalled
from tests.helpers import tiny_job_spec


def _curve(accs: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "selection_acc": a, "eval_split": "selection"} for i, a in enumerate(accs)]


@pytest.mark.parametrize(
    ("accs", "patience", "stop"),
    [
        ([0.5, 0.6, 0.6, 0.6], 2, True),  # two epochs without a strictly better accuracy
        ([0.5, 0.6, 0.6, 0.7], 2, False),  # the last epoch improved
        ([0.5, 0.6, 0.6], 2, False),  # 0.6 beat 0.5 inside the window
        ([0.9, 0.5], 1, True),
        ([0.9], 1, False),  # never before `patience` + 1 epochs
        ([0.5, 0.5, 0.5, 0.5], 3, True),
    ],
)
def test_stalled(accs, patience, stop):
    assert stalled(_curve(accs), patience) is stop


def test_finetune_epochs_auto_or_a_number():
    auto = tiny_job_spec(teacher={"finetune": {"epochs": "auto", "patience": 2, "max_epochs": 7}})
    assert auto.teacher.finetune.epochs == "auto" and auto.teacher.finetune.planned_epochs == 7
    assert stages.STAGES[0].epochs(auto) == 7  # the ETA counts the most it may train
    given = tiny_job_spec(teacher={"finetune": {"epochs": 4}})
    assert given.teacher.finetune.planned_epochs == 4 and given.teacher.finetune.patience == 3
    default = tiny_job_spec(teacher={"finetune": {}})  # `finetune: {}`: every default, early stopping
    assert default.teacher.finetune.epochs == "auto" and default.teacher.finetune.planned_epochs == 30
    with pytest.raises(pydantic.ValidationError):
        tiny_job_spec(teacher={"finetune": {"epochs": "forever"}})
    with pytest.raises(pydantic.ValidationError):
        tiny_job_spec(teacher={"finetune": {"epochs": "auto", "patience": 0}})


def test_finetune_auto_stops_when_selection_stalls_and_keeps_the_best(color_dataset, tmp_path):
    spec = tiny_job_spec(
        # lr 1e-6: the teacher barely moves, its selection accuracy stalls at once
        teacher={"finetune": {"epochs": "auto", "patience": 1, "max_epochs": 5, "lr": 1e-6}},
        train={"epochs": 1},
        baseline=False,
    )
    reporter = RecordingReporter()
    metrics = run_job(spec, color_dataset, tmp_path, reporter)
    curve = metrics["curves"]["teacher_finetune"]
    # it stopped at the first epoch where the rule says so, or ran all 5
    want = next((n for n in range(1, 6) if stalled(curve[:n], 1)), 5)
    assert len(curve) == want == 2 and all(r["epochs"] == 5 for r in curve)
    assert metrics["teacher"]["epochs"] == want
    assert metrics["teacher"]["best_epoch"] == best_row(curve)["epoch"]
    stopped = [d for k, _, d in reporter.events if k == "info" and d.get("stage") == "teacher_finetune"]
    assert bool(stopped) == (want < 5)
