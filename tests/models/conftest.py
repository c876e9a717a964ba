"""Fixtures of the engine tests: small real image folders (generated, and hymenoptera photos)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import HYMENOPTERA


def _images(split: str, per_class: int) -> tuple[list[Path], list[int]]:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not found")
    paths, labels = [], []
    for label, cls in enumerate(("ants", "bees")):
        files = sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:per_class]
        paths += files
        labels += [label] * len(files)
    return paths, labels


@pytest.fixture(scope="session")
def val_images() -> tuple[list[Path], list[int]]:
    return _images("val", 6)


@pytest.fixture(scope="session")
def train_images() -> tuple[list[Path], list[int]]:
    return _images("train", 8)


@pytest.fixture(scope="session")
def lite_features():
    """Real features: lite0 / lite2 with the package ImageNet weights, 8 hymenoptera images, 96 px.

    (student map, teacher map) at `auto` (head conv, 1280 ch) and at blocks.6 (the last block).
    """
    from PIL import Image

    from spkd.models.data.loader import load_rgb
    from spkd.models.networks import weights

    paths = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))[:4]
    paths += sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))[:4]
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(load_rgb(str(p)).resize((96, 96), Image.BILINEAR)).copy())
            .permute(2, 0, 1)
            .float()
            .div(127.5)
            .sub(1.0)
            for p in paths
        ]
    )
    out = {}
    with torch.no_grad():
        for role, name in (("student", "tf_efficientnet_lite0"), ("teacher", "tf_efficientnet_lite2")):
            model, _ = weights.build(name, "package", 2, role, 96)
            model.eval()
            head = model.forward_features(x)
            _, inter = model.forward_intermediates(x, indices=[4])  # feature_info[4]: blocks.6
            out[role] = {"auto": head, "blocks.6": inter[0]}
    return out
