"""models/data/loader.py: dataset scanning, rejection of broken files with reasons, splits and uint8
batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spkd.common.errors import SpkdError
from spkd.models.data import loader
from tests.helpers import HYMENOPTERA, make_folder


def _reasons(scan) -> dict[str, str]:
    return {Path(r["path"]).name: r["reason"] for r in scan.rejected}


def test_broken_and_odd_files(tmp_path):
    root = make_folder(tmp_path / "train", {"cats": 4, "dogs": 4})
    make_folder(tmp_path / "val", {"cats": 2, "dogs": 2}, seed=3)
    cats = root / "cats"
    (cats / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))  # not an image
    good = (cats / "cats_000.jpg").read_bytes()
    (cats / "truncated.jpg").write_bytes(good[: len(good) // 2])
    png = cats / "whole.png"
    Image.new("RGB", (64, 64), "red").save(png)
    (cats / "truncated.png").write_bytes(png.read_bytes()[:60])
    (cats / "notes.txt").write_text("hello")
    (cats / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "stray.jpg").write_bytes(good)
    Image.new("P", (30, 30)).save(cats / "placeholder.gif")  # decodes: kept, like hymenoptera's GIF
    Image.new("L", (30, 30)).save(cats / "gray.png")
    Image.new("CMYK", (30, 30)).save(cats / "cmyk.jpg")
    Image.new("I;16", (30, 30)).save(cats / "deep.png")
    (cats / "link.jpg").symlink_to(cats / "cats_001.jpg")

    scan = loader.scan_dataset(tmp_path)
    reasons = _reasons(scan)
    assert reasons["random.jpg"] == "not an image"
    assert reasons["truncated.jpg"].startswith("corrupt image")
    assert reasons["truncated.png"].startswith(("corrupt image", "not an image"))
    assert reasons["notes.txt"] == "not an image"
    assert ".DS_Store" not in reasons  # OS metadata is ignored, not listed
    assert reasons["stray.jpg"] == "not inside a class folder"
    kept = {Path(s.path).name for s in scan.train}
    # link.jpg points inside the dataset: followed (the symlink policy, common/scan.py)
    assert {"placeholder.gif", "gray.png", "cmyk.jpg", "deep.png", "whole.png", "link.jpg"} <= kept
    assert scan.counts() == {"train": {"cats": 10, "dogs": 4}, "val": {"cats": 2, "dogs": 2}}
    # every kept file really loads as 8-bit RGB
    for sample in scan.train:
        assert loader.load_rgb(sample.path).mode == "RGB"


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    make_folder(tmp_path / "a", {"x": 2})
    make_folder(tmp_path / "b", {"y": 2})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # our 40x40 photos now count as "huge"
    with pytest.raises(SpkdError) as err:
        loader.scan_dataset(tmp_path)
    assert err.value.code == "empty_class"
    assert loader.check_image(next((tmp_path / "a" / "x").iterdir())).startswith("image too large")


def test_one_class_is_an_error(tmp_path):
    make_folder(tmp_path, {"only": 5})
    with pytest.raises(SpkdError) as err:
        loader.scan_dataset(tmp_path)
    assert err.value.code == "too_few_classes" and err.value.field == "dataset"


def test_class_without_usable_image_is_an_error(tmp_path):
    make_folder(tmp_path, {"good": 5})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(SpkdError) as err:
        loader.scan_dataset(tmp_path)
    assert err.value.code == "empty_class" and "bad" in err.value.message


def test_missing_folder(tmp_path):
    with pytest.raises(SpkdError) as err:
        loader.scan_dataset(tmp_path / "nope")
    assert err.value.code == "dataset_not_found"


def test_seeded_split_is_deterministic_and_stratified(tmp_path):
    make_folder(tmp_path, {"a": 20, "b": 10})
    first = loader.scan_dataset(tmp_path, 0.2, seed=7)
    again = loader.scan_dataset(tmp_path, 0.2, seed=7)
    other = loader.scan_dataset(tmp_path, 0.2, seed=8)
    assert first.report_from == "seeded"
    assert [s.path for s in first.report] == [s.path for s in again.report]
    assert [s.path for s in first.report] != [s.path for s in other.report]
    assert first.counts()["val"] == {"a": 4, "b": 2}
    assert not {s.path for s in first.report} & {s.path for s in first.train}


def test_hymenoptera_scan_keeps_everything_that_decodes():
    scan = loader.scan_dataset(HYMENOPTERA)
    assert scan.classes == ["ants", "bees"]
    assert scan.counts() == {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    # imageNotFound.gif is a real GIF: kept, like torchvision does; SOURCE.md is beside the splits
    assert scan.rejected == [{"path": "SOURCE.md", "reason": "not inside a class folder"}]


def test_loader_yields_uint8_batches_with_indices(color_dataset):
    from spkd.models.networks.factory import DataConfig

    cfg = DataConfig((3, 32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.9, "center")
    scan = loader.scan_dataset(color_dataset)
    ds = loader.ImageDataset(scan.train, loader.make_transform(32, cfg, training=True))
    batches = list(loader.make_loader(ds, 16, training=True, seed=0, epoch=0, num_workers=0))
    images, labels, indices = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
    assert labels.dtype == torch.int64 and indices.shape == (16,)
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(len(ds)))
    norm = loader.normalize_batch(images, torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5))
    assert norm.min() >= -1 and norm.max() <= 1


def test_deep_nesting_and_non_utf8_names_are_reported_not_fatal(tmp_path):
    """A class nested deeper than MAX_DEPTH is cut off with a reason (no RecursionError); a name
    that is not UTF-8 on disk is shown with U+FFFD, so the rejected list stays valid JSON."""
    import json
    import os

    from spkd.common import scan as scanner

    make_folder(tmp_path, {"a": 2, "b": 2})
    deep = tmp_path / "a" / "/".join(["d"] * (scanner.MAX_DEPTH + 5))
    make_folder(deep, {"x": 1})
    bad_name = os.fsencode(tmp_path / "b") + b"/caf\xe9.txt"
    with open(bad_name, "wb") as fh:
        fh.write(b"text")
    found = scanner.scan_tree(tmp_path)
    reasons = {r["path"]: r["reason"] for r in found.rejected}
    assert reasons.pop("b/caf\ufffd.txt") == "not an image"
    ((path, reason),) = reasons.items()
    assert path.count("/") == scanner.MAX_DEPTH and "nested more than" in reason
    assert found.counts() == {"all": {"a": 2, "b": 2}}
    json.dumps(found.rejected, ensure_ascii=False).encode("utf-8")


def test_selection_is_carved_from_train_stratified_seeded_and_disjoint(tmp_path):
    make_folder(tmp_path / "train", {"a": 30, "b": 8, "c": 2})
    make_folder(tmp_path / "val", {"a": 5, "b": 5, "c": 5}, seed=3)
    scan = loader.scan_dataset(tmp_path, 0.2, seed=0)
    chosen = loader.with_selection(scan, 0.1, seed=0)
    assert chosen.counts()["selection"] == {"a": 3, "b": 1, "c": 1}  # at least one image per class
    assert chosen.counts()["train"] == {"a": 27, "b": 7, "c": 1}
    assert chosen.report == scan.report  # the report split is untouched
    train, selection = {s.path for s in chosen.train}, {s.path for s in chosen.selection}
    assert not train & selection and train | selection == {s.path for s in scan.train}
    assert chosen.sizes() == {"train": 35, "selection": 5, "report": 15}
    assert chosen.summary()["roles"]["selection"].startswith("0.1 of train/")
    again = loader.with_selection(scan, 0.1, seed=0)
    assert [s.path for s in again.selection] == [s.path for s in chosen.selection]
    assert [s.path for s in loader.with_selection(scan, 0.1, seed=1).selection] != [
        s.path for s in chosen.selection
    ]
    off = loader.with_selection(scan, 0.0, seed=0)
    assert off.selection == [] and off.train == scan.train and "selection" not in off.counts()


def test_test_split_is_reported_and_val_selects(tmp_path):
    make_folder(tmp_path / "train", {"a": 6, "b": 6})
    make_folder(tmp_path / "val", {"a": 2, "b": 3}, seed=3)
    make_folder(tmp_path / "test", {"a": 4, "b": 4}, seed=4)
    scan = loader.with_selection(loader.scan_dataset(tmp_path, 0.2, seed=0), 0.1, seed=0)
    assert scan.roles == {"train": "train/", "selection": "val/", "report": "test/"}
    assert all("/test/" in s.path for s in scan.report) and all("/val/" in s.path for s in scan.selection)
    assert scan.sizes() == {"train": 12, "selection": 5, "report": 8}  # nothing carved from train


def test_a_second_scan_sees_images_added_inside_a_class_folder(tmp_path):
    """No scan is kept between calls: an image added to a class folder (the root's mtime does not
    change) is in the next scan. A per-process scan cache keyed on the root once hid it."""
    make_folder(tmp_path / "train", {"cats": 4, "dogs": 4})
    make_folder(tmp_path / "val", {"cats": 2, "dogs": 2}, seed=3)
    before = loader.scan_dataset(tmp_path)
    cats = tmp_path / "train" / "cats"
    (cats / "extra.jpg").write_bytes((cats / "cats_000.jpg").read_bytes())
    after = loader.scan_dataset(tmp_path)
    assert len(after.train) == len(before.train) + 1
