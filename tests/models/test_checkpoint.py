"""Resume from an epoch-end checkpoint mid-stage: the final weights equal an uninterrupted run's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models import checkpoint
from models.callbacks import NullReporter, RecordingReporter, StopRequested
from models.pipeline import run_job
from tests.models.conftest import tiny_spec

SPEC = dict(teacher={"finetune": {"epochs": 2}}, distill={"kd_weight": 0.5})
STEPS = 2  # 48 train images less 4 for selection / batch 16


@pytest.fixture(scope="module")
def reference(color_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_job(tiny_spec(**SPEC), color_dataset, out, NullReporter())
    return out


def _tensors(path):
    return load_file(str(path))


def _curves(out):
    curves = json.loads((out / "metrics.json").read_text())["curves"]
    drop = {"seconds", "images_per_sec"}
    return {
        s: [{k: v for k, v in row.items() if k not in drop} for row in rows] for s, rows in curves.items()
    }


@pytest.mark.parametrize(
    ("stop_after", "stage", "epoch"),
    [(STEPS + 1, "teacher_finetune", 1), (4 * STEPS + STEPS + 1, "distill", 1)],
    ids=["mid-teacher", "mid-distill"],
)
def test_resume_gives_identical_weights(color_dataset, tmp_path, reference, stop_after, stage, epoch):
    stopper = RecordingReporter(stop_after_steps=stop_after)
    with pytest.raises(StopRequested):
        run_job(tiny_spec(**SPEC), color_dataset, tmp_path, stopper)
    saved = checkpoint.load(tmp_path)
    assert saved["current"]["stage"] == stage and saved["current"]["epoch"] == epoch
    assert not (tmp_path / "student.safetensors").exists()  # no results from a stopped run

    resumed = RecordingReporter()
    run_job(tiny_spec(**SPEC), color_dataset, tmp_path, resumed)
    assert any(kind == "info" and "resuming" in msg for kind, msg, _ in resumed.events)
    for name in ("student.safetensors", "teacher.safetensors"):
        got, want = _tensors(tmp_path / name), _tensors(reference / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"{name} differs after resume"
    assert _curves(tmp_path) == _curves(reference)


def test_checkpoint_is_atomic_and_safe_to_load(tmp_path):
    checkpoint.save(tmp_path, {"completed": ["baseline"], "w": torch.ones(2)})
    checkpoint.save(tmp_path, {"completed": ["baseline", "distill"], "w": torch.zeros(2)})
    files = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert files == ["last.pt"]  # no temp files left behind
    assert checkpoint.load(tmp_path)["completed"] == ["baseline", "distill"]


def test_rng_state_round_trip():
    import random

    import numpy as np

    checkpoint.seed_everything(1, "x")
    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_finished_run_returns_at_once(color_dataset, reference):
    again = RecordingReporter()
    metrics = run_job(tiny_spec(**SPEC), color_dataset, reference, again)
    assert metrics["distilled"]["val_acc"] is not None
    assert not again.progresses  # nothing retrained
