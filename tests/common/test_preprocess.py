"""common/preprocess.py gives the model what evaluation gave it: the engine's eval transform
(models/data/loader.py make_transform, training=False) and its device-side normalisation
(models/training/engine.py Normalizer), compared on real photos for every crop mode, resampling and
crop share the engine can be configured with, and read from a hub folder's config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spkd.common.decode import load_rgb
from spkd.common.preprocess import EvalConfig, eval_batch, eval_pixels
from spkd.models.data.loader import make_transform
from spkd.models.networks.factory import DataConfig
from spkd.models.training.engine import Normalizer, Runtime
from tests.helpers import HYMENOPTERA

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)


@pytest.fixture(scope="module")
def photos() -> list:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not found")
    # portrait, landscape and near-square photos of different sizes, plus a tiny and a grey one made here
    paths = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:4]
    paths += sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))[:4]
    imgs = [load_rgb(p) for p in paths]
    assert len({i.size for i in imgs}) > 3 and any(i.height > i.width for i in imgs)
    return [*imgs, imgs[0].resize((20, 13)), imgs[1].convert("L").convert("RGB")]


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct", [0.875, 0.95, 1.0, 1.15])
def test_matches_the_engine_eval_transform(
    photos, crop_mode: str, interpolation: str, crop_pct: float
) -> None:
    for size in (32, 97, 224):
        dc = DataConfig(
            (3, size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation, crop_pct, crop_mode
        )
        transform = make_transform(size, dc, training=False)
        engine_px = torch.stack([transform(img) for img in photos])
        engine = Normalizer(dc, CPU, torch.nn.Identity())(engine_px).numpy()
        cfg = EvalConfig(size, dc.mean, dc.std, interpolation, crop_pct, crop_mode)
        ours_px = np.stack([eval_pixels(img, cfg) for img in photos])
        assert ours_px.dtype == np.uint8 and ours_px.shape == tuple(engine_px.shape)
        assert np.array_equal(ours_px, engine_px.numpy()), (size, "pixels differ")
        ours = eval_batch(photos, cfg)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, engine, rtol=0, atol=1e-6)


def test_reads_the_data_config_of_a_hub_folder(tmp_path: Path, photos) -> None:
    """The config.json the export stage writes (timm save_for_hf) gives the engine's config back."""
    from spkd.models.networks import factory
    from spkd.models.results.export import save_hub_folder

    model = factory.create("test_efficientnet", 2, image_size=48)
    dc = factory.data_config(model, 48)
    save_hub_folder(model, tmp_path / "student", ["a", "b"], dc)
    cfg = EvalConfig.from_hub_config(json.loads((tmp_path / "student" / "config.json").read_text()))
    assert (cfg.image_size, cfg.mean, cfg.std) == (48, dc.mean, dc.std)
    assert (cfg.interpolation, cfg.crop_pct, cfg.crop_mode) == (dc.interpolation, dc.crop_pct, dc.crop_mode)
    engine_px = torch.stack([make_transform(48, dc, training=False)(img) for img in photos])
    engine = Normalizer(dc, CPU, model)(engine_px).numpy()
    np.testing.assert_allclose(eval_batch(photos, cfg), engine, rtol=0, atol=1e-6)


def test_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        EvalConfig(32, (0.5,) * 3, (0.5,) * 3, interpolation="random")
    with pytest.raises(ValueError, match="crop_mode"):
        EvalConfig(32, (0.5,) * 3, (0.5,) * 3, crop_mode="random")
    with pytest.raises(ValueError, match="pretrained_cfg"):
        EvalConfig.from_hub_config({"architecture": "x"})
