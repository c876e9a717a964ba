"""A broken run fails, clearly, and misfits are found before any training.

Through the real engine (run_job / validate_job / train_stage) on tiny timm models and generated
images. NaN is made the way users make it: a learning rate or a loss weight far too large.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pydantic
import pytest
import timm
import torch

from spkd.common.errors import SpkdError
from spkd.common.reporter import RecordingReporter
from spkd.common.spec import JobSpec
from spkd.models.methods import Distiller
from spkd.models.networks import factory, weights
from spkd.models.networks.features import FeatureTap
from spkd.models.pipeline import run_job, validate_job
from spkd.models.results import export
from spkd.models.training import engine
from tests.helpers import make_folder, tiny_job_spec
from tests.models.helpers import eval_source, train_source

# SP at 1e6 x a layer weight of 1e6 on a learning rate of 1: the loss is ~1e12 at step 1 and the
# weights are NaN by step 2 (a user typing 1e6 for a weight they meant as 1e-6 gets the same)
EXPLODING = {
    "teacher": {"model": "test_resnet", "weights": "none", "finetune": None},
    "student": {"model": "test_efficientnet"},
    "baseline": False,
    "train": {"lr": 1.0, "epochs": 1, "batch_size": 4},
    "distill": {"sp_weight": 1e6, "layers": [{"teacher": "auto", "student": "auto", "weight": 1e6}]},
}


def _strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _progress_losses(reporter: RecordingReporter) -> list[float]:
    return [p.loss for p in reporter.progresses if p.loss is not None]


@pytest.mark.parametrize("path", ["memory", "memory+teacher_cache", "loader"])
def test_exploding_loss_fails_with_non_finite_loss(color_dataset, tmp_path, monkeypatch, path):
    distill = dict(EXPLODING["distill"])
    if path.endswith("teacher_cache"):
        distill.update(teacher_cache="on", teacher_views=2)
    spec = tiny_job_spec(**{**EXPLODING, "distill": distill})
    reporter = RecordingReporter()
    with pytest.raises(SpkdError) as err:
        run_job(
            spec,
            color_dataset,
            tmp_path / "out",
            reporter,
            data_path="auto" if path != "loader" else "loader",
        )
    e = err.value
    assert e.code == "non_finite_loss", e
    assert "distill epoch 1 step " in e.message and "NaN" in e.message
    assert "distill.sp_weight (now 1e+06)" in e.message and "train.lr (now 1)" in e.message
    assert e.field in ("train.lr", "distill.sp_weight")
    # nothing exported, no epoch-end checkpoint of NaN weights, no NaN reported as progress
    assert not (tmp_path / "out" / "student").exists()
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not [d for kind, _, d in reporter.events if kind in ("checkpoint", "epoch_end")]
    assert all(math.isfinite(v) for v in _progress_losses(reporter))


def test_weights_ruined_by_the_last_step_fail_at_validation_loss(color_dataset, tmp_path):
    """lr 10 on a ResNet: every training loss stays finite, the updated weights do not."""
    spec = tiny_job_spec(
        teacher={"model": "test_resnet", "weights": "none", "finetune": None},
        student={"model": "test_resnet"},
        baseline=False,
        train={"lr": 10.0, "epochs": 2, "batch_size": 16},
        distill={"sp_weight": 1e6},
    )
    with pytest.raises(SpkdError) as err:
        run_job(spec, color_dataset, tmp_path / "out", RecordingReporter())
    assert err.value.code == "non_finite_loss"
    assert "distill epoch 1" in err.value.message and "train.lr (now 10)" in err.value.message
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_batch_of_one_is_refused_by_the_spec():
    with pytest.raises(pydantic.ValidationError) as err:
        tiny_job_spec(train={"batch_size": 1})
    (problem,) = err.value.errors()
    assert problem["loc"] == ("train", "batch_size") and "at least 2" in problem["msg"]


def test_batch_of_one_is_refused_by_validate_job_too(color_dataset):
    """A spec built without validation (model_copy, as the worker does) is checked again."""
    spec = tiny_job_spec()
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": 1})})
    with pytest.raises(SpkdError) as err:
        validate_job(spec, color_dataset)
    assert err.value.code == "batch_too_small" and err.value.field == "train.batch_size"


def test_infinite_layer_weight_is_refused_by_the_spec(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "teacher: {model: test_resnet}\nstudent: {model: test_resnet}\ndataset: {path: x}\n"
        "distill: {layers: [{teacher: auto, student: auto, weight: .inf}]}\n"
    )
    with pytest.raises(pydantic.ValidationError) as err:
        JobSpec.from_yaml(path)
    assert any("weight" in map(str, e["loc"]) for e in err.value.errors())


def test_an_epoch_without_any_step_is_an_error_not_a_zero_loss(color_dataset):
    """The in-memory batch source never yields a batch of 1: at batch size 1 the epoch is empty."""
    paths = sorted(str(p) for p in (color_dataset / "train").rglob("*.jpg"))
    labels = [0 if "/blue/" in p else 1 for p in paths]
    runtime = engine.pick_runtime("fp32", "cpu")
    train, _ = train_source(paths, labels, 32, 1, runtime.device, workers=1)
    val, _ = eval_source(paths[:4], labels[:4], 32, 2, runtime.device, workers=1)
    model = engine.prepare(timm.create_model("test_resnet", pretrained=False, num_classes=2), runtime)
    plan = engine.StagePlan(
        name="baseline",
        model=model,
        distiller=Distiller(FeatureTap(model, []), None, []),
        student_norm=engine.Normalizer(factory.data_config(model, 32), runtime, model),
        epochs=1,
        lr=0.01,
        weight_decay=0.0,
        seed=0,
        train_batches=train.epoch,
        val_batches=val.epoch,
        steps_per_epoch=len(paths),
    )
    with pytest.raises(SpkdError) as err:
        engine.train_stage(plan, runtime, RecordingReporter(), engine.Clock(total_steps=1), lambda _p: None)
    assert err.value.code == "no_training_steps" and err.value.field == "train.batch_size"


def test_nan_metrics_are_never_written_as_bare_nan(tmp_path):
    with pytest.raises(SpkdError) as err:
        export.write_json(tmp_path / "metrics.json", {"distilled": {"report_loss": float("nan")}})
    assert err.value.code == "non_finite_metrics"
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------------------ misfits


def test_vit_at_a_size_its_patch_does_not_divide_fails_before_training(color_dataset, tmp_path):
    spec = tiny_job_spec(student={"model": "test_vit"}, train={"image_size": 36, "epochs": 1})
    reporter = RecordingReporter()
    with pytest.raises(SpkdError) as err:
        run_job(spec, color_dataset, tmp_path / "out", reporter)
    e = err.value
    assert e.code == "model_input_mismatch" and e.field == "train.image_size"
    assert "student test_vit" in e.message and "36x36" in e.message and "multiple of 16" in e.message
    assert not reporter.progresses and not [k for k, _, _ in reporter.events if k == "stage_started"]


def test_a_teacher_that_cannot_take_the_size_is_named(color_dataset):
    spec = tiny_job_spec(teacher={"model": "test_vit", "weights": "none"}, train={"image_size": 40})
    with pytest.raises(SpkdError) as err:
        validate_job(spec, color_dataset)
    assert err.value.code == "model_input_mismatch" and "teacher test_vit" in err.value.message


def test_a_teacher_size_its_patch_does_not_divide_names_teacher_image_size(color_dataset):
    spec = tiny_job_spec(teacher={"model": "test_vit", "weights": "none", "image_size": 40})
    with pytest.raises(SpkdError) as err:
        validate_job(spec, color_dataset)
    e = err.value
    assert e.code == "model_input_mismatch" and e.field == "teacher.image_size"
    assert "40x40" in e.message and "set teacher.image_size to a multiple of 16" in e.message


def _earlier_job_teacher(folder: Path, classes: list[str], layout: str = "hub") -> Path:
    """What a job's export stage writes for its teacher: its hub folder (`teacher/model.safetensors`,
    `config.json` with label_names); `layout="flat"`: the old layout's `teacher.safetensors` with the
    model card `teacher.json` (class_names) beside it. Returns the weight file."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(classes))
    cfg = factory.data_config(model, 32)
    if layout == "hub":
        export.save_hub_folder(model, folder / "job_earlier" / "teacher", classes, cfg)
        return folder / "job_earlier" / "teacher" / "model.safetensors"
    path = folder / "job_earlier" / "teacher.safetensors"
    export.save_weights(model, path)
    export.write_json(path.with_suffix(".json"), {"model": "test_resnet", "class_names": list(classes)})
    return path


@pytest.mark.parametrize("layout", ["hub", "flat"])
@pytest.mark.parametrize("earlier", [["cat", "dog", "fox"], ["cat", "dog"], ["red", "blue"]])
def test_reused_teacher_head_on_other_classes_names_both_lists(color_dataset, tmp_path, earlier, layout):
    """3 classes, 2 other names (same count: was silently reused by index), same names reordered;
    read from a job's hub folder and from the old layout's flat file and card alike."""
    path = _earlier_job_teacher(tmp_path, earlier, layout)
    spec = tiny_job_spec(teacher={"weights": str(path), "finetune": None})
    with pytest.raises(SpkdError) as err:
        validate_job(spec, color_dataset)
    e = err.value
    assert e.code == "class_mismatch" and e.field == "teacher.weights"
    assert str(earlier) in e.message and "['blue', 'red']" in e.message


def test_reused_head_on_other_classes_is_replaced_when_fine_tuned(color_dataset, tmp_path):
    path = _earlier_job_teacher(tmp_path, ["cat", "dog"])
    spec = tiny_job_spec(teacher={"weights": str(path), "finetune": {"epochs": 1}})
    found = validate_job(spec, color_dataset).warnings
    assert any("['cat', 'dog']" in w and "new head" in w for w in found)
    _, head = weights.build("test_resnet", str(path), 2, "teacher", 32, ["blue", "red"])
    assert head is False  # the body only: the head's outputs meant cat and dog
    _, head = weights.build("test_resnet", str(path), 2, "teacher", 32, ["cat", "dog"])
    assert head is True
    # the same names in the same order: the head is reused as it is, KD allowed, no warning
    same = _earlier_job_teacher(tmp_path / "same", ["blue", "red"])
    spec = tiny_job_spec(teacher={"weights": str(same), "finetune": None}, distill={"kd_weight": 1.0})
    assert not [w for w in validate_job(spec, color_dataset).warnings if "class" in w]


def test_weights_holding_nan_are_refused_at_validation(color_dataset, tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    path = tmp_path / "broken.safetensors"
    export.save_weights(model, path)
    with pytest.raises(SpkdError) as err:
        validate_job(tiny_job_spec(teacher={"weights": str(path)}), color_dataset)
    assert err.value.code == "non_finite_weights" and err.value.field == "teacher.weights"


def test_fp16_on_the_cpu_says_it_runs_fp32(tmp_path):
    data = make_folder(tmp_path / "data", {"a": 4, "b": 4})
    spec = tiny_job_spec(
        teacher={"model": "test_resnet", "weights": "none", "finetune": None},
        student={"model": "test_resnet"},
        baseline=False,
        train={"epochs": 1, "batch_size": 4, "precision": "fp16"},
    )
    reporter = RecordingReporter()
    run_job(spec, data, tmp_path / "out", reporter, device="cpu")
    notes = [(m, d) for kind, m, d in reporter.events if kind == "warning" and d.get("requested")]
    assert len(notes) == 1 and "fp16" in notes[0][0] and "fp32" in notes[0][0]
    assert notes[0][1] == {"requested": "fp16", "device": "cpu"}
    # and the run itself is strict JSON end to end
    _strict_loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("resume_at", "code"), [("evaluate", "non_finite_loss"), ("export", "non_finite_weights")]
)
def test_non_finite_student_is_never_evaluated_or_exported(tmp_path, resume_at, code):
    """A run resumed after distill (or after evaluate) whose checkpointed student went NaN on disk."""
    from spkd.models.training import checkpoint

    data = make_folder(tmp_path / "data", {"a": 4, "b": 4})
    spec = tiny_job_spec(
        teacher={"model": "test_resnet", "weights": "none", "finetune": None},
        student={"model": "test_resnet"},
        baseline=False,
        train={"epochs": 1, "batch_size": 4},
    )
    out = tmp_path / "out"
    run_job(spec, data, out, RecordingReporter())
    state = checkpoint.load(out)
    stages = ["distill", "evaluate", "export"]
    state["completed"] = stages[: stages.index(resume_at)]
    checkpoint.save(out, state)
    student = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(float("nan"))
    # The distilled student's stage weights, as the distill stage leaves them for evaluate and export.
    export.save_weights(student, checkpoint.checkpoint_dir(out) / "distilled.safetensors")
    before = (out / "student" / "model.safetensors").read_bytes()
    with pytest.raises(SpkdError) as err:
        run_job(spec, data, out, RecordingReporter())
    assert err.value.code == code, err.value
    assert resume_at in err.value.message or "distilled student" in err.value.message
    assert (out / "student" / "model.safetensors").read_bytes() == before  # not replaced


def test_a_head_without_class_names_is_reused_with_a_warning(color_dataset, tmp_path):
    path = _earlier_job_teacher(tmp_path, ["blue", "red"], "flat")
    path.with_suffix(".json").unlink()  # a bare weight file: nothing says what its outputs mean
    spec = tiny_job_spec(teacher={"weights": str(path), "finetune": None})
    found = validate_job(spec, color_dataset).warnings
    assert any("no JSON with class_names" in w and "by class index" in w for w in found), found


@pytest.mark.parametrize(
    ("precision", "device", "bf16_ok", "runs", "why"),
    [
        ("auto", "cuda", True, torch.bfloat16, None),
        ("auto", "cuda", False, torch.float16, None),  # SP's Gram is fp32 whatever autocast does
        ("auto", "cpu", False, None, None),
        ("bf16", "cuda", True, torch.bfloat16, None),
        ("bf16", "cuda", False, None, "this GPU has no bf16"),  # autocast would switch itself off
        ("bf16", "cpu", False, torch.bfloat16, None),
        ("fp16", "cuda", False, torch.float16, None),
        ("fp16", "cpu", False, None, "fp16 autocast needs a CUDA GPU"),
        ("fp32", "cuda", True, None, None),
    ],
)
def test_each_precision_request_runs_as_said(precision, device, bf16_ok, runs, why) -> None:
    """What `train.precision` becomes on each device, and the warning when it is not what was
    asked: a V100 or T4 asked for bf16 runs fp32 and the job says so (autocast alone would only
    log a warning in the worker's output and carry on in fp32)."""
    from spkd.models.training import validation

    dtype = engine.amp_dtype_for(precision, device, bf16_ok)
    assert dtype == runs
    note = validation.precision_note(precision, dtype, torch.device(device))
    if why is None:
        assert note is None, note
    else:
        assert note is not None and why in note and precision in note, note
