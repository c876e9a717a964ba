"""A job's batches (models/data/batches.py, FastPath): in-memory batches, cache decisions, the
loader fallback."""

from __future__ import annotations

import timm
import torch

from spkd.common.reporter import RecordingReporter
from spkd.common.spec import JobSpec
from spkd.models.data import batches, inmemory, loader
from spkd.models.networks import factory
from spkd.models.networks.features import FeatureTap
from spkd.models.training import engine
from spkd.models.training.teacher_cache import TeacherCache


def _fast(train_images, val_images, cache: str, views: int, epochs: int = 3, disabled: bool = False):
    spec = JobSpec.model_validate(
        {
            "teacher": {"model": "test_resnet", "weights": "none"},
            "student": {"model": "test_efficientnet", "weights": "none"},
            "dataset": {"path": "x"},
            "distill": {"teacher_cache": cache, "teacher_views": views},
            "train": {"epochs": epochs, "batch_size": 4, "image_size": 32, "num_workers": 2},
        }
    )
    scan = loader.DatasetScan(
        classes=["ants", "bees"],
        train=[loader.Sample(str(p), label) for p, label in zip(*train_images, strict=True)],
        report=[loader.Sample(str(p), label) for p, label in zip(*val_images, strict=True)],
    )
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    cfg = factory.data_config(teacher, 32)
    runtime = engine.pick_runtime("fp32", "cpu")
    reporter = RecordingReporter()
    fast = batches.FastPath(
        spec,
        scan,
        runtime.device,
        32,
        loader.make_transform(32, cfg, training=False),
        reporter,
        disabled=disabled,
    )
    norm = engine.Normalizer(cfg, runtime, teacher)
    live = engine.LiveTeacher(FeatureTap(teacher, ["auto"]), norm, runtime)
    return fast, live, reporter


def test_in_memory_batches_for_every_stage(train_images, val_images):
    fast, _live, reporter = _fast(train_images, val_images, "off", 2)
    train_batches, val_batches = fast.loaders("baseline")
    images, labels, indices = next(iter(train_batches(0)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert sum(b.images.shape[0] for b in val_batches()) == len(val_images[0])
    info = [d for k, _m, d in reporter.events if k == "info"]
    assert info[0]["data_path"] == "host" and info[0]["decode_seconds"] >= 0


def test_teacher_cache_decisions(train_images, val_images):
    fast, live, reporter = _fast(train_images, val_images, "auto", views=8, epochs=3)
    assert fast.teacher(live) is live  # 8 views for 3 epochs: no teacher passes saved
    assert "would not save" in reporter.events[-1][1]

    fast, live, reporter = _fast(train_images, val_images, "auto", views=2, epochs=3)
    cache = fast.teacher(live)
    assert isinstance(cache, TeacherCache) and cache.views == 2
    assert fast.loaders("distill")[0] == cache.epoch and fast.loaders("baseline")[0] != cache.epoch
    event = reporter.events[-1][2]
    assert event["teacher_cache"] is True and event["bytes"] == cache.nbytes
    # kd_weight 0: only SP features are stored, no logits.
    assert cache.logits is None and len(cache.features) == 1

    fast, live, _ = _fast(train_images, val_images, "off", views=2)
    assert fast.teacher(live) is live


def test_loader_fallback(train_images, val_images):
    fast, live, reporter = _fast(train_images, val_images, "on", views=2, disabled=True)
    assert fast.loaders("distill") is None
    assert fast.teacher(live) is live
    assert any(k == "warning" and "in-memory" in m for k, m, _ in reporter.events)


def test_memory_budget_fallback(train_images, val_images, monkeypatch):
    monkeypatch.setattr(inmemory, "HOST_DATA_FRACTION", 0.0)  # nothing fits: stream from disk
    fast, _live, reporter = _fast(train_images, val_images, "auto", views=2)
    assert fast.loaders("baseline") is None
    assert "DataLoader" in reporter.events[-1][1]
