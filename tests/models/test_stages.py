"""The stage registry (models/stages/) against the API's stage list, and one built model per role
and job (models/networks/bank.py): validation, data configs and every stage share it."""

from __future__ import annotations

from collections import Counter

import timm
import torch

from spkd.common import spec
from spkd.common.reporter import RecordingReporter
from spkd.models.networks import factory, weights
from spkd.models.networks.bank import ModelBank, ModelKey
from spkd.models.pipeline import run_valid, validate_job
from spkd.models.results.report import FALLBACK_COLOUR, stage_colour
from spkd.models.stages import STAGES, planned
from spkd.models.training import checkpoint
from tests.helpers import make_folder, tiny_job_spec


def test_registry_is_the_api_stage_list_in_order():
    assert tuple(s.name for s in STAGES) == spec.STAGES
    colours = [stage_colour(name) for name in spec.STAGES]  # the report draws every stage in its own colour
    assert len(set(colours)) == len(colours) and FALLBACK_COLOUR not in colours


def test_registry_plans_and_counts_epochs_as_the_stage_list_says():
    """The registry's plan and epochs are common.spec.STAGE_INFO's, which the dashboard reads too."""
    jobs = [
        tiny_job_spec(),
        tiny_job_spec(teacher={"finetune": None}, baseline=False),
        tiny_job_spec(teacher={"finetune": {"epochs": 3}}, train={"epochs": 5}),
    ]
    for job in jobs:
        for stage, info in zip(STAGES, spec.STAGE_INFO, strict=True):
            assert stage.planned(job) == info.planned(job), (stage.name, job)
            assert stage.trains == info.trains, stage.name
            if stage.trains and stage.planned(job):
                assert stage.epochs(job) == info.epochs(job) > 0, stage.name
    assert STAGES[0].epochs(jobs[2]) == 3 and STAGES[1].epochs(jobs[2]) == 5


def test_planned_stages_follow_the_spec():
    assert [s.name for s in planned(tiny_job_spec())] == list(spec.STAGES)
    lean = tiny_job_spec(teacher={"finetune": None}, baseline=False)
    assert [s.name for s in planned(lean)] == ["distill", "evaluate", "export"]
    assert [s.name for s in STAGES if s.trains] == ["teacher_finetune", "baseline", "distill"]


def test_every_needed_file_is_produced_by_an_earlier_stage():
    produced: list[str] = []
    for stage in STAGES:
        assert set(stage.needs) <= set(produced), stage.name
        produced += stage.produces
    assert len(produced) == len(set(produced))  # no two stages write the same file


def test_a_job_builds_each_model_once(tmp_path, monkeypatch):
    """Validation, the data configs, teacher fine-tuning, baseline, the SP weight search, distill,
    evaluate and export: one timm build for the teacher and one for the student."""
    built: Counter[str] = Counter()
    create = timm.create_model

    def counting(name, *args, **kwargs):
        built[name] += 1
        return create(name, *args, **kwargs)

    monkeypatch.setattr(factory.timm, "create_model", counting)
    data = make_folder(tmp_path / "data", {"a": 12, "b": 12})
    job = tiny_job_spec(distill={"sp_weight": [1.0, 10.0]}, train={"epochs": 2, "batch_size": 8})
    assert [s.name for s in planned(job)] == list(spec.STAGES)
    reporter = RecordingReporter()
    run_valid(validate_job(job, data), tmp_path / "out", reporter)
    assert [d["stage"] for kind, _m, d in reporter.events if kind == "stage_finished"] == list(spec.STAGES)
    assert any(kind == "search" for kind, _m, _d in reporter.events)
    assert built == {"test_resnet": 1, "test_efficientnet": 1}


def test_copies_start_from_the_built_weights_and_rngs_but_are_separate():
    """The baseline and the distilled student: same weights, same RNG state after, own modules."""
    bank = ModelBank()
    key = ModelKey("student", "test_efficientnet", "none", ("a", "b"), 32, seed=7)
    checkpoint.seed_everything(7, "init", "student")
    reference, _ = weights.build("test_efficientnet", "none", 2, "student", 32, ["a", "b"])
    after_build = torch.rand(4)
    baseline, _ = bank.copy(key)
    after_copy = torch.rand(4)
    distilled, _ = bank.copy(key)
    assert torch.equal(after_copy, after_build)
    assert baseline is not distilled and baseline is not bank.initial(key).model
    for name, value in reference.state_dict().items():
        assert torch.equal(baseline.state_dict()[name], value), name
        assert torch.equal(distilled.state_dict()[name], value), name
    with torch.no_grad():
        next(baseline.parameters()).add_(1.0)  # training one changes neither the other nor the bank
    assert torch.equal(next(distilled.parameters()), next(reference.parameters()))
    assert torch.equal(next(bank.initial(key).model.parameters()), next(reference.parameters()))
