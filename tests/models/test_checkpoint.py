"""Resume from an epoch-end checkpoint mid-stage: the final weights equal an uninterrupted run's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from spkd.common.reporter import Fenced, NullReporter, RecordingReporter, StopRequested
from spkd.core import attempts
from spkd.models.pipeline import run_job
from spkd.models.training import checkpoint
from tests.helpers import tiny_job_spec

SPEC = dict(teacher={"finetune": {"epochs": 2}}, distill={"kd_weight": 0.5})
STEPS = 2  # 48 train images less 4 for selection / batch 16


@pytest.fixture(scope="module")
def reference(color_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    # compared bit for bit with runs made inside tests, so it must run as they do: on one thread
    # (float sums split over 2 threads differ in the last bits, and MKL drops threads under load)
    assert torch.get_num_threads() == 1, "module fixtures must train on one thread like the tests"
    run_job(tiny_job_spec(**SPEC), color_dataset, out, NullReporter())
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
        run_job(tiny_job_spec(**SPEC), color_dataset, tmp_path, stopper)
    saved = checkpoint.load(tmp_path)
    assert saved["current"]["stage"] == stage and saved["current"]["epoch"] == epoch
    assert not (tmp_path / "student").exists()  # no results from a stopped run

    resumed = RecordingReporter()
    run_job(tiny_job_spec(**SPEC), color_dataset, tmp_path, resumed)
    assert any(kind == "info" and "resuming" in msg for kind, msg, _ in resumed.events)
    for name in ("student/model.safetensors", "teacher/model.safetensors"):
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
    metrics = run_job(tiny_job_spec(**SPEC), color_dataset, reference, again)
    assert metrics["distilled"]["report_acc"] is not None
    assert not again.progresses  # nothing retrained


class FencingReporter(RecordingReporter):
    """Records like RecordingReporter; `ensure_current` raises Fenced once `fenced_when` is true
    (what the service's reporter does after another attempt took the job over)."""

    def __init__(self, fenced_when) -> None:
        super().__init__()
        self.fenced_when = fenced_when
        self.checks = 0

    def ensure_current(self) -> None:
        self.checks += 1
        if self.fenced_when(self):
            raise Fenced("taken over")


def _published(out):
    return sorted(p.name for p in out.iterdir() if p.is_file())


@pytest.mark.parametrize(
    "point",
    ["first-checkpoint", "export"],
)
def test_a_fenced_run_publishes_nothing(color_dataset, tmp_path, point):
    """Fenced before its first checkpoint, or right before publishing the artifacts: no file of
    that attempt appears, and Fenced goes through the engine untouched."""
    if point == "export":
        reporter = FencingReporter(lambda rep: any(d.get("stage") == "export" for _, _, d in rep.events))
    else:
        reporter = FencingReporter(lambda rep: True)
    with pytest.raises(Fenced):
        run_job(tiny_job_spec(**SPEC), color_dataset, tmp_path, reporter)
    own = checkpoint.checkpoint_dir(tmp_path)
    if point == "export":
        assert (own / "export" / "student.onnx").is_file()  # staged, never published
        assert checkpoint.load(tmp_path)["completed"][-1] == "evaluate"
    else:
        assert reporter.checks == 1 and not (own / "last.pt").exists()
    assert _published(tmp_path) == []
    assert not [p for p in own.rglob(".*")]  # no temp file left behind


def test_each_attempt_writes_its_own_folder(color_dataset, tmp_path, reference):
    """The service's attempt folders (core/attempts.py) with the real engine: attempt 1 stops
    mid-distill; attempt 2's folder starts from attempt 1's checkpoint and finishes with weights
    identical to an uninterrupted run. A late write of attempt 1 (frozen, then thawed) lands in
    attempt 1's own folder and changes nothing of attempt 2's: a later attempt starts from
    attempt 2's checkpoint, not from the stale one."""
    first, adopted = attempts.open_attempt(tmp_path, 1)
    assert adopted is None
    with pytest.raises(StopRequested):
        run_job(tiny_job_spec(**SPEC), color_dataset, first, RecordingReporter(5 * STEPS + 1))
    stale = checkpoint.load(first)
    assert stale["current"]["stage"] == "distill"

    second, adopted = attempts.open_attempt(tmp_path, 2)
    assert adopted == 1
    linked = second / "checkpoints" / "last.pt"
    run_job(tiny_job_spec(**SPEC), color_dataset, second, RecordingReporter())
    for name in ("student/model.safetensors", "teacher/model.safetensors"):
        got, want = _tensors(second / name), _tensors(reference / name)
        assert all(torch.equal(got[k], want[k]) for k in want), f"{name} differs after the takeover"
    before = {p: p.read_bytes() for p in second.rglob("*") if p.is_file()}

    checkpoint.save(first, {"late": torch.zeros(3)})  # the stale attempt's late write, in its folder
    (first / "student.onnx").write_bytes(b"stale")  # and a late publish
    assert {p: p.read_bytes() for p in second.rglob("*") if p.is_file()} == before
    assert linked.is_file() and checkpoint.load(second)["completed"][-1] == "export"
    third, adopted = attempts.open_attempt(tmp_path, 3)
    assert adopted == 2
    again = RecordingReporter()
    run_job(tiny_job_spec(**SPEC), color_dataset, third, again)
    assert not again.progresses  # started from attempt 2's finished state: nothing retrained
