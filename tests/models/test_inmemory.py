"""The decode-once, augment-on-device data path (models/data/inmemory.py) on real hymenoptera JPEGs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform

from spkd.models.data import augment
from spkd.models.data import inmemory as fd
from tests.models.helpers import eval_source, normalize, train_source

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = torch.device("cpu")


@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bicubic"), (0.95, "bilinear")])
def test_eval_path_matches_timm_eval_transform(val_images, crop_pct, interpolation):
    paths, labels = val_images
    source, plan = eval_source(
        paths, labels, 224, 5, CPU, crop_pct=crop_pct, interpolation=interpolation, workers=2
    )
    assert source is not None and plan.placement == "host"
    reference = create_transform(224, is_training=False, crop_pct=crop_pct, interpolation=interpolation)
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in paths])
    batches = list(source.epoch())
    assert [b.images.shape[0] for b in batches] == [5, 5, 2]
    ours = torch.cat([normalize(b.images, MEAN, STD) for b in batches])
    assert ours.shape == expected.shape == (len(paths), 3, 224, 224)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.tensor(labels))


def _train_source(train_images, seed=0, batch_size=6, image_size=64):
    paths, labels = train_images
    source, plan = train_source(paths, labels, image_size, batch_size, CPU, seed=seed, workers=2)
    assert source is not None and plan.placement == "host"
    return source


def test_train_batches_have_valid_shapes_ranges_and_cover_the_epoch(train_images):
    source = _train_source(train_images)
    n = len(train_images[0])
    batches = list(source.epoch(0))
    assert [b.images.shape[0] for b in batches] == [6, 6, 4]
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 64, 64)
        assert b.images.float().std() > 5  # real image content, not a constant fill
        assert torch.equal(b.labels, torch.tensor(train_images[1])[b.indices])
        assert ((b.boxes >= 0) & (b.boxes <= 1)).all()
        assert ((b.jitter >= 0.6 - 1e-6) & (b.jitter <= 1.4 + 1e-6)).all()
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(n))
    x = normalize(batches[0].images, MEAN, STD)
    assert x.dtype == torch.float32
    assert x.min() >= (0 - max(MEAN)) / min(STD) - 1e-4 and x.max() <= (1 - min(MEAN)) / min(STD) + 1e-4


def test_train_augment_is_deterministic_under_a_seed(train_images):
    a = [b.images for b in _train_source(train_images, seed=3).epoch(1)]
    b = [b.images for b in _train_source(train_images, seed=3).epoch(1)]
    c = [b.images for b in _train_source(train_images, seed=3).epoch(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_crop_boxes_follow_random_resized_crop_in_original_pixels():
    sizes = torch.tensor([[375, 500], [500, 333], [100, 1000]]).repeat(400, 1)
    boxes, flips = augment.sample_crop_params(sizes, torch.Generator().manual_seed(0), scale=(0.25, 1.0))
    h, w = sizes[:, 0].float(), sizes[:, 1].float()
    bw, bh = (boxes[:, 2] - boxes[:, 0]) * w, (boxes[:, 3] - boxes[:, 1]) * h
    area = bw * bh / (w * h)
    aspect = bw / bh
    fitted = sizes[:, 0] != 100  # the 10:1 image mostly needs the centre fallback
    assert (area[fitted] > 0.24).all() and (area <= 1 + 1e-6).all()
    assert (aspect[fitted] > 0.74).all() and (aspect[fitted] < 1.34).all()
    # Fallback for extreme shapes: the whole height, width clamped to ratio 4/3, centred.
    fallback = (~fitted) & (area > 0.13) & (area < 0.14)
    assert fallback.any()
    centre_x = boxes[fallback][:, 0] + boxes[fallback][:, 2]
    assert torch.allclose(centre_x, torch.ones_like(centre_x), atol=0.01)
    assert 0.4 < flips.float().mean() < 0.6


def test_crop_resize_full_box_is_a_resize_and_flip_is_exact():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=g)
    boxes, no_flip = augment.center_params(4)
    out = augment.crop_resize(images, boxes, no_flip, 20)
    ref = F.interpolate(images.float(), size=(20, 20), mode="bilinear", align_corners=False)
    assert (out.float() - ref).abs().max() <= 0.5 + 1e-4  # only the final rounding differs
    flipped = augment.crop_resize(images, boxes, torch.ones(4, dtype=torch.bool), 20)
    assert torch.equal(flipped, out.flip(-1))
    # A box on the left half, upscaled 2x, shows the left half of the image.
    half = augment.crop_resize(images, torch.tensor([[0.0, 0.0, 0.5, 1.0]]).repeat(4, 1), no_flip, 40)
    ref_half = F.interpolate(images[..., :20].float(), size=(40, 40), mode="bilinear", align_corners=False)
    assert (half.float() - ref_half).abs()[..., 2:-2].max() <= 0.5 + 1e-4  # edges: border padding


def test_color_jitter_identity_and_brightness():
    x = torch.rand(2, 3, 8, 8) * 200
    assert torch.allclose(augment.color_jitter(x.clone(), torch.ones(2, 3)), x, atol=1e-4)
    brighter = augment.color_jitter(x.clone(), torch.tensor([[1.2, 1.0, 1.0], [0.5, 1.0, 1.0]]))
    assert torch.allclose(brighter[0], (x[0] * 1.2).clamp(0, 255), atol=1e-3)
    assert torch.allclose(brighter[1], x[1] * 0.5, atol=1e-3)


def test_memory_plan_falls_back_to_the_loader_when_images_do_not_fit(train_images):
    paths, labels = train_images
    need = fd.image_store_bytes(len(paths), fd.store_size_for(224))
    assert need == len(paths) * 3 * 256 * 256
    plan = fd.plan_memory(need, CPU, gpu_budget=0, host_budget=need - 1)
    assert plan.placement == "loader" and "loader" in plan.describe()
    source, plan = train_source(paths, labels, 224, 4, CPU, host_budget=need - 1)
    assert source is None and plan.placement == "loader"
    assert fd.plan_memory(need, CPU, gpu_budget=10 * need, host_budget=need).placement == "host"
    assert fd.host_available_bytes() > 0
    assert math.isclose(fd.store_size_for(224), 256)
