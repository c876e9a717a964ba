"""teacher.image_size: the teacher sees one augmented view at its own size, the student the same
view at train.image_size (models/data/batches.py, the Normalizers in models/training/engine.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from spkd.common.reporter import RecordingReporter
from spkd.common.spec import JobSpec
from spkd.models.data import batches, loader
from spkd.models.networks import factory
from spkd.models.networks.bank import ModelBank
from spkd.models.networks.features import FeatureTap
from spkd.models.pipeline import run_job
from spkd.models.training import engine
from spkd.models.training.teacher_cache import TeacherCache
from tests.helpers import tiny_job_spec

STUDENT, TEACHER = 32, 64


def _spec(teacher: dict, train: dict | None = None, **over) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": {"weights": "none", **teacher},
            "student": {"model": "tf_efficientnet_lite0", "weights": "none"},
            "dataset": {"path": "x"},
            "train": {"image_size": 224, **(train or {})},
            **over,
        }
    )


def test_auto_is_the_pretrained_size_capped():
    lite2 = {"model": "tf_efficientnet_lite2"}  # timm's pretrained input size: 260
    assert factory.teacher_image_size(_spec(lite2)) == 260
    assert factory.teacher_image_size(_spec(lite2, {"image_size": 128})) == 256  # 2 x the student
    assert factory.teacher_image_size(_spec({"model": "vit_base_patch16_384"})) == 384
    assert factory.teacher_image_size(_spec({"model": "vit_base_patch16_384"}, {"image_size": 256})) == 384
    assert factory.teacher_image_size(_spec({"model": "test_resnet"}, {"image_size": 32})) == 64
    # train.image_size None: the student's pretrained size (224) is what auto caps against
    assert factory.teacher_image_size(_spec(lite2, {"image_size": None})) == 260
    assert factory.teacher_image_size(_spec({**lite2, "image_size": 200})) == 200
    for bad in (8, 2000, "big"):
        with pytest.raises(ValidationError, match="teacher.image_size"):
            _spec({**lite2, "image_size": bad})


def _data(train_images, val_images, data_path: str, teacher_size: int = TEACHER, **distill):
    spec = JobSpec.model_validate(
        {
            "teacher": {"model": "test_resnet", "weights": "none", "image_size": teacher_size},
            "student": {"model": "test_efficientnet", "weights": "none"},
            "dataset": {"path": "x"},
            "distill": distill,
            "train": {"epochs": 3, "batch_size": 4, "image_size": STUDENT, "num_workers": 0},
        }
    )
    scan = loader.DatasetScan(
        classes=["ants", "bees"],
        train=[loader.Sample(str(p), label) for p, label in zip(*train_images, strict=True)],
        report=[loader.Sample(str(p), label) for p, label in zip(*val_images, strict=True)],
    )
    runtime = engine.pick_runtime("fp32", "cpu")
    data = batches.open_data(spec, scan, ModelBank(), runtime, RecordingReporter(), data_path)
    return data, runtime


def _seed() -> None:
    random.seed(0)  # timm's RandomResizedCropAndInterpolation draws from `random`
    torch.manual_seed(0)


@pytest.mark.parametrize("data_path", ["auto", "loader"])
def test_distill_batch_is_one_view_at_two_sizes(train_images, val_images, data_path):
    data, runtime = _data(train_images, val_images, data_path)
    assert data.teacher_image_size == TEACHER and data.teacher_cfg.input_size[-1] == TEACHER
    _seed()  # the DataLoader path's crops come from the global RNGs (num_workers 0)
    distill = next(iter(data.loaders("distill")[0](0))).images
    _seed()
    student_only = next(iter(data.loaders("baseline")[0](0))).images  # the same epoch, student size
    assert distill.shape[-1] == TEACHER and student_only.shape[-1] == STUDENT
    model = torch.nn.Conv2d(3, 3, 1)  # only the Normalizers' sizes matter here
    teacher_in = engine.Normalizer(data.teacher_cfg, runtime, model, data.teacher_image_size)(distill)
    student_in = engine.Normalizer(data.student_cfg, runtime, model, data.image_size)(distill)
    assert teacher_in.shape[-1] == TEACHER and student_in.shape[-1] == STUDENT
    # the student's half of the distill view is the crop and flip the student gets on its own
    alone = engine.Normalizer(data.student_cfg, runtime, model, data.image_size)(student_only)
    same = (student_in - alone).abs().mean()
    flipped = (student_in - alone.flip(-1)).abs().mean()
    shifted = (student_in - alone.roll(1, 0)).abs().mean()  # another image's view
    assert same < 0.25 * min(flipped, shifted), (same, flipped, shifted)
    big = engine.Normalizer(data.student_cfg, runtime, model, TEACHER)(distill)  # one normalisation
    down = F.interpolate(big, size=STUDENT, mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(down, student_in, atol=1e-5)
    # the teacher's evaluation runs at its size, the student's at its own
    assert next(iter(data.loaders("teacher_finetune")[1]())).images.shape[-1] == TEACHER
    assert next(iter(data.loaders("distill")[1]())).images.shape[-1] == STUDENT


def test_teacher_cache_at_the_teachers_size(train_images, val_images):
    data, runtime = _data(train_images, val_images, "auto", teacher_cache="on", teacher_views=2)
    teacher = factory.create("test_resnet", 2, image_size=TEACHER)
    norm = engine.Normalizer(data.teacher_cfg, runtime, teacher, TEACHER)
    live = engine.LiveTeacher(FeatureTap(teacher, ["auto"]), norm, runtime)
    assert data.fast is not None
    cache = data.fast.teacher(live)
    assert isinstance(cache, TeacherCache) and cache.source.image_size == TEACHER
    epoch = iter(data.loaders("distill")[0](0))  # kept: the cache answers inside its epoch
    images, _labels, indices = next(epoch)
    assert images.shape[-1] == TEACHER
    cached, live_out = cache(images, indices), live(images, indices)
    assert torch.allclose(cached[1][0].float(), live_out[1][0], rtol=0.02, atol=0.02)


@pytest.mark.parametrize(
    ("data_path", "cache", "measure"),
    [("auto", "off", True), ("loader", "off", False), ("auto", "on", False)],
)
def test_job_with_a_larger_teacher(color_dataset, tmp_path, data_path, cache, measure):
    spec = tiny_job_spec(
        teacher={"image_size": TEACHER},
        train={"epochs": 1},
        distill={"teacher_cache": cache, "teacher_views": 1},
        export={"measure": measure},
    )
    reporter = RecordingReporter()
    metrics = run_job(spec, color_dataset, tmp_path, reporter, data_path=data_path)
    assert metrics["image_size"] == STUDENT and metrics["teacher_image_size"] == TEACHER
    assert metrics["teacher"]["report_acc"] is not None
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"][-1] == TEACHER
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"][-1] == STUDENT
    if cache == "on":
        assert any(d.get("teacher_cache") for _k, _m, d in reporter.events)
    html = (tmp_path / "report.html").read_text()
    assert f"Image size: student {STUDENT} px, teacher {TEACHER} px." in html
    if measure:
        assert f"(the teacher at {TEACHER} px)" in html
        assert f"Cost at {TEACHER} px" in (tmp_path / "teacher" / "README.md").read_text()
        deploy = metrics["deploy"]
        assert deploy["teacher_image_size"] == TEACHER
        assert deploy["models"]["teacher"]["image_size"] == TEACHER
        assert deploy["models"]["student"]["image_size"] == STUDENT


def test_teacher_at_the_train_size_is_untouched(train_images, val_images):
    """teacher.image_size = train.image_size: the distill stage's batches are the student's own
    views, bit for bit, and neither Normalizer resizes (seeded results as before the option)."""
    data, runtime = _data(train_images, val_images, "auto", teacher_size=STUDENT)
    distill = next(iter(data.loaders("distill")[0](0))).images
    alone = next(iter(data.loaders("baseline")[0](0))).images
    assert torch.equal(distill, alone) and distill.shape[-1] == STUDENT
    model = torch.nn.Conv2d(3, 3, 1)
    sized = engine.Normalizer(data.teacher_cfg, runtime, model, STUDENT)(distill)
    assert torch.equal(sized, engine.Normalizer(data.teacher_cfg, runtime, model)(distill))
