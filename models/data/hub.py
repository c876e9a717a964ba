"""Datasets named by `dataset.hf` (README.md, "Datasets"): a Hugging Face image-classification
dataset, or one saved with `Dataset.save_to_disk` / `DatasetDict.save_to_disk` under the data root,
turned once per host into an ImageFolder that common/scan.py reads like any other folder.

The folder is `<cache>/<key>/` with `train/`, `validation/`, `test/` (the splits the dataset has;
only `dataset.split` when given, then val is held out by `dataset.val_fraction`) and one folder per
class name from the label column's ClassLabel feature. `<key>` hashes name + revision + split +
columns, so each variant is built once; a file lock makes concurrent jobs wait for one build.
The `datasets` library is imported here only (the worker extra); the API never imports this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from common.errors import SpkdError

SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation"}
SPLIT_NAMES |= {"val": "validation", "test": "test", "testing": "test"}
DONE = ".spkd-complete"


def cache_key(source: str, revision: str | None, split: str | None, image_col: str, label_col: str) -> str:
    """A folder name for one variant: readable prefix + sha256 of every input."""
    raw = json.dumps([source, revision, split, image_col, label_col])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source)[-40:].strip("._") or "ds"
    return f"{slug}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def _load(source: str, local: Path | None, revision: str | None, split: str | None) -> dict[str, Any]:
    """{split name: datasets.Dataset}. `local`: a save_to_disk folder; else a hub name (downloads
    into HF_HOME on first use)."""
    import datasets  # the worker extra

    if local is not None:
        loaded = datasets.load_from_disk(str(local))
    else:
        loaded = datasets.load_dataset(source, revision=revision)
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if split is not None:
        if split not in parts:
            msg = f"dataset {source!r} has no split {split!r} (it has: {', '.join(sorted(parts))})"
            raise SpkdError("dataset_split_not_found", msg, "dataset.split")
        return {"train": parts[split]}
    return parts


def _class_names(ds: Any, label_col: str, image_col: str, source: str) -> list[str]:
    import datasets

    for col, what in ((image_col, "image_column"), (label_col, "label_column")):
        if col not in ds.features:
            msg = f"dataset {source!r} has no column {col!r} (columns: {', '.join(ds.features)})"
            raise SpkdError("dataset_column_not_found", msg, f"dataset.{what}")
    feature = ds.features[label_col]
    if not isinstance(feature, datasets.ClassLabel):
        msg = f"column {label_col!r} of {source!r} is not a ClassLabel (it is {type(feature).__name__})"
        raise SpkdError("dataset_not_classification", msg, "dataset.label_column")
    return list(feature.names)


def _write_split(ds: Any, out: Path, names: list[str], image_col: str, label_col: str) -> None:
    """Each row -> out/<class name>/<row>.png (lossless: the one decoder reads it like any file)."""
    for name in names:
        (out / _safe(name)).mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(ds):
        img = row[image_col]
        img.save(out / _safe(names[row[label_col]]) / f"{i:07d}.png")


def _safe(name: str) -> str:
    """A class name as a folder name (a '/' or a leading '.' would change what the scanner sees)."""
    s = name.replace("/", "_").replace("\\", "_").strip()
    return ("_" + s) if s.startswith(".") or not s else s


def materialise(
    source: str,
    local: Path | None,
    cache_dir: Path,
    revision: str | None = None,
    split: str | None = None,
    image_col: str = "image",
    label_col: str = "label",
) -> Path:
    """The ImageFolder of this dataset variant under `cache_dir`, built on first use (under a lock,
    into a temp folder renamed into place). Raises SpkdError (`dataset_split_not_found`,
    `dataset_column_not_found`, `dataset_not_classification`) for a dataset that does not fit."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A saved folder saved again is another variant: its modification time is part of the key.
    ident = f"{local}@{local.stat().st_mtime_ns}" if local is not None else source
    dest = cache_dir / cache_key(ident, revision, split, image_col, label_col)
    with (cache_dir / f"{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second job on the same dataset waits for this build
        if (dest / DONE).is_file():
            return dest
        parts = _load(source, local, revision, split)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            for name, ds in parts.items():
                folder = SPLIT_NAMES.get(name.lower())
                if folder is None:
                    continue  # e.g. "unsupervised": not a classification split
                names = _class_names(ds, label_col, image_col, source)
                _write_split(ds, tmp / folder, names, image_col, label_col)
            (tmp / DONE).write_text(json.dumps({"source": source, "revision": revision, "split": split}))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------ torchvision's datasets
# Sizes of the generated FakeData splits (no download): enough for a real, tiny job.
FAKEDATA_SIZES = {"train": 48, "test": 24}
FAKEDATA_CLASSES = 2


def _torchvision_splits(name: str, root: Path, split: str | None) -> dict[str, Any]:
    """{split: torchvision dataset} for `torchvision.datasets.<name>`, downloading into `root`.

    torchvision's classes name their splits two ways: `train=True/False` (CIFAR, MNIST...) or
    `split="train"|"val"|"test"` (Flowers102, DTD...); both are tried from the signature."""
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    if name == "FakeData":
        return {
            s: cls(size=n, image_size=(3, 32, 32), num_classes=FAKEDATA_CLASSES, random_offset=i * 10_000)
            for i, (s, n) in enumerate(FAKEDATA_SIZES.items())
            if split in (None, s)
        }
    params = inspect.signature(cls).parameters
    wanted = [split] if split else ["train", "val", "test"]
    parts: dict[str, Any] = {}
    for s in wanted:
        try:
            if "train" in params:
                if s not in ("train", "test"):
                    continue
                parts[s] = cls(str(root), train=s == "train", download=True)
            else:
                parts[s] = cls(str(root), split=s, download=True)
        except ValueError:  # a split this dataset does not have ("val" of CIFAR-style sets)
            if split:
                raise SpkdError(
                    "dataset_split_not_found", f"torchvision {name} has no split {s!r}", "dataset.split"
                ) from None
    return parts


def _torchvision_classes(ds: Any) -> list[str]:
    names = getattr(ds, "classes", None)
    if names:
        return [str(c) for c in names]
    count = getattr(ds, "num_classes", None) or len({int(ds[i][1]) for i in range(len(ds))})
    return [str(i) for i in range(count)]


def materialise_torchvision(name: str, home: Path, split: str | None = None) -> Path:
    """The ImageFolder of `torchvision.datasets.<name>` under `home/spkd-imagefolders`, built on
    first use under a lock (downloads go to `home/spkd-downloads/<name>`). One folder per split
    (train/, val/, test/) and per class name (the dataset's `classes`, else the label numbers)."""
    cache_dir = home / "spkd-imagefolders"
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / cache_key(f"torchvision:{name}", None, split, "", "")
    with (cache_dir / f"{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / DONE).is_file():
            return dest
        parts = _torchvision_splits(name, home / "spkd-downloads" / name, split)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            for part, ds in parts.items():
                names = _torchvision_classes(ds)
                folder = tmp / ("train" if split else part)
                for cls_name in names:
                    (folder / _safe(cls_name)).mkdir(parents=True, exist_ok=True)
                for i in range(len(ds)):
                    img, label = ds[i]
                    img.convert("RGB").save(folder / _safe(names[int(label)]) / f"{i:07d}.png")
            (tmp / DONE).write_text(json.dumps({"source": f"torchvision:{name}", "split": split}))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
