"""OOM handling: a real training step hits a (simulated) memory limit, the batch halves, lr scales."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from spkd.common.reporter import RecordingReporter
from spkd.models.data.loader import Batch
from spkd.models.training.oom import BatchSizeController, split_batch
from tests.models.helpers import FakeMemoryLimit, eval_source, normalize, train_source


def _step(model, optimizer):
    def run(batch: Batch) -> int:
        optimizer.zero_grad(set_to_none=True)
        logits = model(normalize(batch.images, (0.5,) * 3, (0.5,) * 3))
        F.cross_entropy(logits, batch.labels).backward()
        optimizer.step()
        return batch.images.shape[0]

    return run


def test_oom_halves_batch_scales_lr_warns_and_retries(train_images):
    paths, labels = train_images
    source, _ = train_source(paths, labels, 32, 8, torch.device("cpu"), workers=2)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.08, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    limit = FakeMemoryLimit(model, max_batch=3)
    reporter = RecordingReporter()

    def resize_source(size: int) -> None:
        source.batch_size = size

    controller = BatchSizeController(8, reporter, "distill", on_change=resize_source)
    before = [p.detach().clone() for p in model.parameters()]
    batches = source.epoch(0)
    first = next(batches)
    assert first.images.shape[0] == 8
    done = controller.run(first, _step(model, optimizer), optimizer, scheduler)

    # 8 fails, 4 fails, then four chunks of 2: every image of the failed batch trained on once.
    assert done == [2, 2, 2, 2] and limit.triggered == 2
    assert controller.batch_size == 2 and source.batch_size == 2
    assert controller.lr_scale == pytest.approx(0.25)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    assert scheduler.base_lrs == [pytest.approx(0.02)]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    warnings = [data for kind, _msg, data in reporter.events if kind == "warning"]
    assert [(w["previous_batch_size"], w["batch_size"]) for w in warnings] == [(8, 4), (4, 2)]
    assert "learning rate" in reporter.events[0][1]
    # The rest of the epoch now comes at the new size, without further OOMs.
    rest = list(batches)
    for batch in rest:
        assert controller.run(batch, _step(model, optimizer), optimizer, scheduler) == [2]
    assert len(rest) == 4 and limit.triggered == 2 and len(warnings) == 2
    limit.remove()


def test_oom_below_the_minimum_batch_is_an_error():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    FakeMemoryLimit(model, max_batch=1)
    controller = BatchSizeController(4, RecordingReporter(), "baseline")

    def step(batch):
        return model(batch[0]).sum()

    with pytest.raises(torch.cuda.OutOfMemoryError, match="cannot go below 2"):
        controller.run((torch.zeros(4, 4), torch.zeros(4)), step, optimizer)


def test_other_errors_are_not_swallowed():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = BatchSizeController(4, RecordingReporter(), "baseline")
    with pytest.raises(ValueError):
        controller.run(torch.zeros(4, 4), lambda _b: (_ for _ in ()).throw(ValueError("bad")), optimizer)
    assert controller.batch_size == 4


def test_split_batch_handles_nested_batches():
    batch = (torch.arange(10), {"x": torch.zeros(10, 3), "w": torch.ones(2)}, [torch.arange(10)])
    chunks = split_batch(batch, 4)
    assert [c[0].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(c[1]["w"].shape == (2,) for c in chunks)  # not batch-shaped: passed through
    assert [c[2][0].shape[0] for c in chunks] == [4, 4, 2]


def test_engine_stage_survives_oom_by_halving(train_images):
    """The engine's own train_stage, with a simulated memory limit on the student."""
    from spkd.models.methods import Distiller
    from spkd.models.networks import factory
    from spkd.models.networks.features import FeatureTap
    from spkd.models.training import engine

    paths, labels = train_images
    runtime = engine.pick_runtime("fp32", "cpu")
    train, _ = train_source(paths, labels, 32, 8, runtime.device, workers=2, drop_last=True)
    val, _ = eval_source(paths[:4], labels[:4], 32, 2, runtime.device, workers=2)
    torch.manual_seed(0)
    model = engine.prepare(timm.create_model("test_resnet", pretrained=False, num_classes=2), runtime)
    plan = engine.StagePlan(
        name="baseline",
        model=model,
        distiller=Distiller(FeatureTap(model, []), None, []),
        student_norm=engine.Normalizer(factory.data_config(model, 32), runtime, model),
        epochs=2,
        lr=0.04,
        weight_decay=0.0,
        seed=0,
        train_batches=train.epoch,
        val_batches=val.epoch,
        steps_per_epoch=len(train),
    )
    limit = FakeMemoryLimit(model, max_batch=4)
    reporter = RecordingReporter()
    curve, _ = engine.train_stage(plan, runtime, reporter, engine.Clock(total_steps=4), lambda _p: None)
    assert len(curve) == 2 and all(row["train_loss"] > 0 for row in curve)
    warnings = [(msg, data) for kind, msg, data in reporter.events if kind == "warning"]
    assert len(warnings) == 1 and limit.triggered == 1  # halved once, then every chunk fits
    assert warnings[0][1]["batch_size"] == 4 and warnings[0][1]["lr_scale"] == 0.5
    assert "batch size 8" in warnings[0][0] and "batch size 4" in warnings[0][0]
    # Both epochs still trained on every image: 16 per epoch, in chunks of 4.
    assert [round(row["images_per_sec"] > 0) for row in curve] == [1, 1]
    assert len(reporter.progresses) == 4  # steps counted per loader batch, as planned


def test_halving_never_leaves_a_chunk_of_one_image():
    """5 images at batch 2 would end with a chunk of 1: SP over one image is 0, BatchNorm fails."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    limit = FakeMemoryLimit(model, max_batch=2)
    controller = BatchSizeController(None, RecordingReporter(), "distill")
    seen: list[int] = []

    def step(batch):
        images, labels = batch
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        seen.append(images.shape[0])
        return images.shape[0]

    batch = (torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 0, 1, 0]))
    assert controller.run(batch, step, optimizer) == [2, 2] and seen == [2, 2]
    assert controller.batch_size == 2 and limit.triggered == 1  # 5 failed once, halved to 5 // 2
    limit.remove()
