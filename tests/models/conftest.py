"""Fixtures of the engine tests: small real image folders (generated, and hymenoptera photos)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import HYMENOPTERA, make_folder


@pytest.fixture(scope="session")
def color_dataset(tmp_path_factory) -> Path:
    """train/ and val/ with two colour classes: small enough for seconds-long CPU runs."""
    root = tmp_path_factory.mktemp("colors")
    make_folder(root / "train", {"blue": 24, "red": 24}, seed=1)
    make_folder(root / "val", {"blue": 10, "red": 10}, seed=2)
    return root


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
