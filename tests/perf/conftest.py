"""Shared fixtures for the throughput tests: real hymenoptera files, one CPU thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HYMENOPTERA = Path(__file__).resolve().parents[3] / "shared" / "data" / "hymenoptera"


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI machine is shared: keep each test on one core.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
