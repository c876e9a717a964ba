"""The teacher's options: `teacher.finetune.epochs: auto` (early stopping on the selection split,
the best epoch kept) and a number honoured as before."""

from __future__ import annotations

import copy

import pydantic
import pytest
import timm
import torch
from safetensors.torch import load_file

from spkd.common.reporter import RecordingReporter
from spkd.models import stages
from spkd.models.networks.bank import ModelBank, ModelKey
from spkd.models.pipeline import run_job
from spkd.models.stages.common import best_row, stalled
from spkd.models.training.engine import Runtime, make_optimizer, make_scheduler
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


def _one_step(model, scale: float):
    """One SGD step of make_optimizer(body_lr_scale=scale) on a fixed batch; returns the optimizer."""
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    cpu = Runtime(torch.device("cpu"), None, False)
    optimizer = make_optimizer(model, 0.1, 0.0, cpu, body_lr_scale=scale)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    return optimizer


def test_body_lr_scale_moves_the_body_by_that_fraction_and_the_head_at_lr():
    start = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    full, scaled = copy.deepcopy(start), copy.deepcopy(start)
    assert len(_one_step(full, 1.0).param_groups) == 1  # 1.0: one group, as before the option
    groups = _one_step(scaled, 0.1).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    head = {n for n, _ in start.named_parameters() if n.startswith(start.default_cfg["classifier"])}
    in_head_group = {id(p) for p in groups[1]["params"]}
    assert head and in_head_group == {id(p) for p in scaled.get_classifier().parameters()}
    before, after_full, after_scaled = (dict(m.named_parameters()) for m in (start, full, scaled))
    for name, p0 in before.items():
        moved_full = (after_full[name] - p0).detach()
        moved_scaled = (after_scaled[name] - p0).detach()
        want = moved_full if name in head else 0.1 * moved_full  # the same gradient: no weight decay
        assert torch.allclose(moved_scaled, want, rtol=1e-3, atol=1e-7), name  # float32 rounding of p + d - p
    sched = make_scheduler(_one_step(copy.deepcopy(start), 0.1), total_steps=20)
    for _ in range(7):
        sched.step()
    lrs = sched.get_last_lr()
    assert lrs[0] == pytest.approx(0.1 * lrs[1])  # the schedule keeps the ratio


def test_teacher_finetune_body_lr_scale_reaches_the_teacher_stage(color_dataset, tmp_path):
    spec = tiny_job_spec(
        teacher={"finetune": {"epochs": 1, "lr": 0.5, "body_lr_scale": 1e-9}},
        train={"epochs": 1, "weight_decay": 0.0},
        baseline=False,
    )
    run_job(spec, color_dataset, tmp_path, RecordingReporter())
    key = ModelKey.of(spec, "teacher", ["blue", "red"], spec.train.image_size)
    initial, _ = ModelBank().copy(key)
    tuned = load_file(tmp_path / "teacher" / "model.safetensors")  # the exported fine-tuned teacher
    head = initial.default_cfg["classifier"]
    body = [n for n, _ in initial.named_parameters() if not n.startswith(head)]
    state = initial.state_dict()
    assert body and all(torch.allclose(tuned[n], state[n], atol=1e-6) for n in body)
    assert not torch.allclose(tuned[f"{head}.weight"], state[f"{head}.weight"])  # the head trained at lr
    with pytest.raises(pydantic.ValidationError):
        tiny_job_spec(teacher={"finetune": {"body_lr_scale": 0}})
