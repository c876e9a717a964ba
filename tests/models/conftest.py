"""Shared fixtures for the engine tests: small real image folders, tiny timm models, one CPU thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HYMENOPTERA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hymenoptera"
HYMENOPTERA = HYMENOPTERA.resolve() if HYMENOPTERA.exists() else Path("/work/shared/data/hymenoptera")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # the machine is shared: one intra-op thread keeps tests from fighting each other
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_image(path: Path, cls: int, rng: np.random.Generator, size: int = 40) -> None:
    """A photo-like RGB JPEG whose colour depends on the class (learnable, but noisy)."""
    base = np.array([200, 60, 50] if cls == 0 else [50, 80, 200], dtype=np.float32)
    pixels = base + rng.normal(0, 40, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls_index, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            write_image(root / name / f"{name}_{i:03d}.jpg", cls_index, rng)
    return root


@pytest.fixture(scope="session")
def color_dataset(tmp_path_factory) -> Path:
    """train/ and val/ with two colour classes: small enough for seconds-long CPU runs."""
    root = tmp_path_factory.mktemp("colors")
    make_folder(root / "train", {"blue": 24, "red": 24}, seed=1)
    make_folder(root / "val", {"blue": 10, "red": 10}, seed=2)
    return root


def tiny_spec(**overrides):
    from models.spec import JobSpec

    spec = {
        "teacher": {"model": "test_resnet", "weights": "none", "finetune": {"epochs": 1}},
        "student": {"model": "test_efficientnet", "weights": "none"},
        "dataset": {"path": "colors"},
        "distill": {"layers": "auto"},
        "train": {"epochs": 2, "batch_size": 16, "image_size": 32, "lr": 0.05, "num_workers": 0},
        "baseline": True,
    }
    for key, value in overrides.items():
        spec[key] = (
            {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
        )
    return JobSpec.model_validate(spec)
