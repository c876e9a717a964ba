"""Datasets named by `dataset.hf` (docs/datasets.md): a Hugging Face image-classification
dataset, or one saved with `Dataset.save_to_disk` / `DatasetDict.save_to_disk` under the data root,
turned once per host into an ImageFolder that common/scan.py reads like any other folder.

The folder is `<cache>/<key>/` with `train/`, `validation/`, `test/` (the splits the dataset has;
only `dataset.split` when given, then val is held out by `dataset.val_fraction`) and one folder per
class name from the label column's ClassLabel feature. Each row's image file is written as the
dataset stores it (`<row number><suffix>`, not decoded here), so the scanner judges it like any file
of an ImageFolder: a corrupt one is skipped and listed with its reason; rows without an image or a
label (-1) are listed too (scan.UNEXTRACTED_FILE). `<key>` hashes name + revision + split +
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

from spkd.common import scan
from spkd.common.errors import SpkdError
from spkd.common.files import STORAGE_FULL_ERRNOS

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
    into HF_HOME on first use). Raises SpkdError `dataset_not_saved` / `dataset_unreadable` (a
    local folder `datasets` cannot load), `dataset_not_found` / `dataset_download_failed` (a hub
    name), `dataset_split_not_found` (no such split; no train split when `split` is None).
    Out-of-memory and full-disk errors pass unchanged."""
    import datasets  # the worker extra

    try:
        if local is not None:
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(source, revision=revision)
    except Exception as exc:  # noqa: BLE001 - turned into a code, or passed on (see _passes)
        if _passes(exc):
            raise
        raise _load_error(exc, source, local) from exc
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if split is not None:
        if split not in parts:
            msg = f"dataset {source!r} has no split {split!r} (it has: {', '.join(sorted(parts))})"
            raise SpkdError("dataset_split_not_found", msg, "dataset.split")
        return {"train": parts[split]}
    if not any(SPLIT_NAMES.get(name.lower()) == "train" for name in parts):
        msg = (
            f"dataset {source!r} has no train split (it has: {', '.join(sorted(parts))}): name the split "
            "to train on with dataset.split"
        )
        raise SpkdError("dataset_split_not_found", msg, "dataset.split")
    return parts


def _passes(exc: BaseException) -> bool:
    """Errors that are not the dataset's: out of memory, a full disk (the runner names them)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    # A local folder's full path is the server's business: its last part only.
    text = re.sub(r"(?<![\w.~/:])/(?:[^\s/'\"`]+/)+([^\s/'\"`]*)", r"\1", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_error(exc: Exception, source: str, local: Path | None) -> SpkdError:
    if local is not None:
        if isinstance(exc, FileNotFoundError):
            msg = (
                f"dataset.hf {source!r} is not a dataset saved with save_to_disk (it has neither "
                "dataset_dict.json nor dataset_info.json and state.json); a folder of images is named "
                "by dataset.path"
            )
            return SpkdError("dataset_not_saved", msg, "dataset.hf")
        msg = (
            f"dataset.hf {source!r} could not be loaded ({_describe(exc)}): save it again with "
            "Dataset.save_to_disk or DatasetDict.save_to_disk"
        )
        return SpkdError("dataset_unreadable", msg, "dataset.hf")
    if isinstance(exc, FileNotFoundError):  # datasets' DatasetNotFoundError: unknown or gated
        msg = f"the Hugging Face hub has no dataset {source!r} this server may read ({_describe(exc)})"
        return SpkdError("dataset_not_found", msg, "dataset.hf")
    msg = (
        f"dataset {source!r} could not be downloaded from the Hugging Face hub ({_describe(exc)}): check "
        "the name and dataset.revision, and that the worker reaches the hub; then resubmit the job"
    )
    return SpkdError("dataset_download_failed", msg, "dataset.hf")


def _class_names(ds: Any, label_col: str, image_col: str, source: str) -> list[str]:
    import datasets

    for col, what in ((image_col, "image_column"), (label_col, "label_column")):
        if col not in ds.features:
            msg = f"dataset {source!r} has no column {col!r} (columns: {', '.join(ds.features)})"
            raise SpkdError("dataset_column_not_found", msg, f"dataset.{what}")
    if not isinstance(ds.features[image_col], datasets.Image):
        kind = type(ds.features[image_col]).__name__
        msg = f"column {image_col!r} of {source!r} is not an Image feature (it is {kind})"
        raise SpkdError("dataset_column_not_image", msg, "dataset.image_column")
    feature = ds.features[label_col]
    if not isinstance(feature, datasets.ClassLabel):
        msg = f"column {label_col!r} of {source!r} is not a ClassLabel (it is {type(feature).__name__})"
        raise SpkdError("dataset_not_classification", msg, "dataset.label_column")
    return list(feature.names)


def _write_split(
    ds: Any, out: Path, names: list[str], image_col: str, label_col: str
) -> list[dict[str, str]]:
    """Each row -> out/<class name>/<row number><suffix>: the image file as the dataset stores it
    (its bytes, or the file its path names), not decoded here. The scanner then decodes it with
    the one decoder and rejects a corrupt or non-image file with its reason, exactly as in an
    ImageFolder (common/scan.py). Rows that give no file (no image data, a label that is no class
    such as -1 for "unlabelled") are returned as rejected entries {path, reason}."""
    import datasets

    for name in names:
        (out / _safe(name)).mkdir(parents=True, exist_ok=True)
    rejected: list[dict[str, str]] = []
    raw = ds.cast_column(image_col, datasets.Image(decode=False))
    for i, row in enumerate(raw):
        where = f"{out.name}/{i:07d}"
        label = row[label_col]
        if not isinstance(label, int) or not 0 <= label < len(names):
            why = f"row {i}: label {label!r} is not one of the {len(names)} classes (an unlabelled row)"
            rejected.append({"path": where, "reason": why})
            continue
        image = row[image_col] or {}
        data, origin = image.get("bytes"), image.get("path") or ""
        if data is None and origin:
            try:
                data = Path(origin).read_bytes()
            except OSError as exc:
                if _passes(exc):
                    raise
                data = None
        if data is None:
            rejected.append({"path": where, "reason": f"row {i}: no image data (nor a readable file)"})
            continue
        suffix = Path(origin).suffix.lower()
        suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
        (out / _safe(names[label]) / f"{i:07d}{suffix}").write_bytes(data)
    return rejected


def _write_rejected(folder: Path, rejected: list[dict[str, str]]) -> None:
    """Rows that gave no image file, listed where the scanner lists an upload's unextracted members
    (scan.UNEXTRACTED_FILE): a job reports them with the files the scanner rejects."""
    if rejected:
        (folder / scan.UNEXTRACTED_FILE).write_text(json.dumps(rejected))


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
            rejected: list[dict[str, str]] = []
            for name, ds in parts.items():
                folder = SPLIT_NAMES.get(name.lower())
                if folder is None:
                    continue  # e.g. "unsupervised": not a classification split
                names = _class_names(ds, label_col, image_col, source)
                rejected += _write_split(ds, tmp / folder, names, image_col, label_col)
            _write_rejected(tmp, rejected)
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

    torchvision's classes name their splits three ways: `train=True/False` (CIFAR, MNIST...),
    `split="train"|"val"|"test"` (Flowers102, DTD..., some say `trainval` or `valid`), or not at
    all (Caltech101, EuroSAT: one set). Without `split`, each role takes the first name the
    dataset has. Raises SpkdError `dataset_split_not_found` for a split it does not have and
    `dataset_download_failed` when the download fails (full disk and out of memory pass)."""
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    if name == "FakeData":
        if split not in (None, *FAKEDATA_SIZES):
            raise _no_split(name, split, tuple(FAKEDATA_SIZES))
        return {
            s: cls(size=n, image_size=(3, 32, 32), num_classes=FAKEDATA_CLASSES, random_offset=i * 10_000)
            for i, (s, n) in enumerate(FAKEDATA_SIZES.items())
            if split in (None, s)
        }
    params = inspect.signature(cls).parameters
    if "train" in params:
        roles = {"train": ("train",), "test": ("test",)}

        def make(s: str) -> Any:
            if s not in ("train", "test"):
                raise ValueError(f"{s!r} is not a split of it; valid values are train and test")
            return cls(str(root), train=s == "train", download=True)
    elif "split" in params:
        roles = {"train": ("train", "trainval"), "val": ("val", "valid"), "test": ("test",)}

        def make(s: str) -> Any:
            return cls(str(root), split=s, download=True)
    else:  # one set
        if split is not None:
            raise _no_split(name, split, ())
        return {"train": _download(name, lambda: cls(str(root), download=True))}
    if split is not None:
        try:
            return {split: _download(name, lambda: make(split))}
        except ValueError as exc:  # torchvision's own check of the split name says which it has
            msg = f"torchvision {name} has no split {split!r} ({_describe(exc)})"
            raise SpkdError("dataset_split_not_found", msg, "dataset.split") from None
    parts: dict[str, Any] = {}
    for role, names in roles.items():
        for candidate in names:
            try:
                parts[role] = _download(name, lambda c=candidate: make(c))
                break
            except ValueError:  # a split this dataset does not have ("val" of CIFAR-style sets)
                continue
    if "train" not in parts:
        raise _no_split(name, "train", tuple(parts))
    return parts


def _no_split(name: str, split: str, known: tuple[str, ...]) -> SpkdError:
    has = f"its splits: {', '.join(known)}" if known else "it is one set: leave dataset.split out"
    return SpkdError(
        "dataset_split_not_found", f"torchvision {name} has no split {split!r} ({has})", "dataset.split"
    )


def _download(name: str, make: Any) -> Any:
    """`make()`, a torchvision dataset that downloads itself; its failure as SpkdError
    `dataset_download_failed` (ValueError, torchvision's split check, and the errors of
    `_passes` go through unchanged)."""
    try:
        return make()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into a code, or passed on
        if _passes(exc):
            raise
        msg = (
            f"torchvision {name} could not be downloaded or read ({_describe(exc)}): check that the worker "
            "reaches the download server and that $TORCH_HOME/spkd-downloads is writable; then resubmit"
        )
        raise SpkdError("dataset_download_failed", msg, "dataset.torchvision") from exc


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
            rejected: list[dict[str, str]] = []
            for part, ds in parts.items():
                names = _torchvision_classes(ds)
                folder = tmp / ("train" if split else part)
                for cls_name in names:
                    (folder / _safe(cls_name)).mkdir(parents=True, exist_ok=True)
                for i in range(len(ds)):
                    img, label = ds[i]
                    if not 0 <= int(label) < len(names):  # -1: an unlabelled image
                        why = f"image {i}: label {int(label)} is not one of the {len(names)} classes"
                        rejected.append({"path": f"{folder.name}/{i:07d}", "reason": why})
                        continue
                    img.convert("RGB").save(folder / _safe(names[int(label)]) / f"{i:07d}.png")
            _write_rejected(tmp, rejected)
            (tmp / DONE).write_text(json.dumps({"source": f"torchvision:{name}", "split": split}))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
