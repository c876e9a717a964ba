"""What a dataset source must be, as far as it can be known without decoding an image: the
`dataset` fields each source reads, torchvision's splits, the layout and columns of a folder that
`Dataset.save_to_disk` wrote, a `dataset.path` that is not such a folder. Torch-free, and reads
nothing but the source's own JSON files and folder listing.

core/sources/ (one module per source kind) runs these at submission (and the worker again at run time,
since files can change in between); the worker's scan (common/scan.py) judges the images. Every
refusal is a `common.errors.SpkdError(code, message, field)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spkd.common import scan
from spkd.common.errors import SpkdError

# The fields of `dataset` that only some sources read, with their defaults: set for another source
# they would be ignored without a word.
_SOURCE_FIELDS = {
    "split": (None, ("hf", "torchvision")),
    "image_column": ("image", ("hf",)),
    "label_column": ("label", ("hf",)),
    "revision": (None, ("hf",)),
}


def check_source_fields(ds: Any) -> None:
    """Refuse a `dataset` field its source does not read (`split` of a `path`, `revision` of a
    torchvision dataset...): SpkdError `dataset_field_not_applicable` naming the field."""
    source = next(k for k in ("id", "path", "hf", "torchvision") if getattr(ds, k) is not None)
    for name, (default, sources) in _SOURCE_FIELDS.items():
        if source not in sources and getattr(ds, name) != default:
            readers = " and ".join(f"dataset.{s}" for s in sources)
            raise SpkdError(
                "dataset_field_not_applicable",
                f"dataset.{name} applies to {readers} only, and this job names dataset.{source}: "
                f"leave dataset.{name} out",
                f"dataset.{name}",
            )


# torchvision's splits, per dataset (models/data/hub.py downloads them; tests/system/test_hf_datasets.py
# compares this table with torchvision's own checks). Empty: one set, no split to choose (val is
# held out by dataset.val_fraction). Splits without labels (STL10's `unlabeled`) are left out.
TORCHVISION_SPLITS: dict[str, tuple[str, ...]] = {
    "CIFAR10": ("train", "test"),
    "CIFAR100": ("train", "test"),
    "Caltech101": (),
    "Country211": ("train", "valid", "test"),
    "DTD": ("train", "val", "test"),
    "EuroSAT": (),
    "FGVCAircraft": ("train", "val", "trainval", "test"),
    "FakeData": ("train", "test"),
    "FashionMNIST": ("train", "test"),
    "Flowers102": ("train", "val", "test"),
    "Food101": ("train", "test"),
    "GTSRB": ("train", "test"),
    "KMNIST": ("train", "test"),
    "MNIST": ("train", "test"),
    "OxfordIIITPet": ("trainval", "test"),
    "PCAM": ("train", "val", "test"),
    "RenderedSST2": ("train", "val", "test"),
    "STL10": ("train", "test"),
    "SVHN": ("train", "test", "extra"),
    "StanfordCars": ("train", "test"),
}


def check_torchvision_split(name: str, split: str | None) -> None:
    """`dataset.split` of a torchvision dataset must be one it has: SpkdError
    `dataset_split_not_found` (field `dataset.split`) otherwise."""
    splits = TORCHVISION_SPLITS.get(name)
    if split is None or splits is None or split in splits:
        return
    has = (
        f"its splits: {', '.join(splits)}"
        if splits
        else "it is one set: leave dataset.split out, val is held out by dataset.val_fraction"
    )
    msg = f"torchvision {name} has no split {split!r} ({has})"
    raise SpkdError("dataset_split_not_found", msg, "dataset.split")


SAVED_DICT = "dataset_dict.json"  # DatasetDict.save_to_disk: {"splits": [...]}, one folder per split
SAVED_FILES = ("dataset_info.json", "state.json")  # Dataset.save_to_disk (and each split of a dict)
_MAX_INFO_BYTES = 16 << 20


def _is_saved(folder: Path) -> bool:
    return (folder / SAVED_DICT).is_file() or all((folder / f).is_file() for f in SAVED_FILES)


def _read_json(path: Path) -> Any:
    """The JSON in `path`; None when it is missing, too large or not JSON."""
    try:
        if path.stat().st_size > _MAX_INFO_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_saved_dataset(
    folder: Path, name: str, split: str | None, image_col: str = "image", label_col: str = "label"
) -> None:
    """`dataset.hf` naming a folder under the data root: it must be what `Dataset.save_to_disk` or
    `DatasetDict.save_to_disk` writes (read from its JSON files, without the `datasets` library),
    with the split to train on and, in every split used, an Image column `image_col` and a
    ClassLabel column `label_col`. Raises SpkdError `dataset_not_saved` (field `dataset.hf`: an
    ImageFolder is named by dataset.path), `dataset_split_not_found`, `dataset_column_not_found`,
    `dataset_column_not_image`, `dataset_not_classification`: the codes the worker's
    models/data/hub.py uses for the same misfits."""

    def not_saved(why: str) -> SpkdError:
        hint = (
            "; a folder of images (class folders, train/ and val/) is named by dataset.path"
            if not _is_saved(folder) and any(p.is_dir() for p in _listing(folder))
            else ""
        )
        return SpkdError(
            "dataset_not_saved",
            f"dataset.hf {name!r} names a folder under the server's data root that is not a dataset "
            f"saved with save_to_disk ({why}){hint}",
            "dataset.hf",
        )

    if (folder / SAVED_DICT).is_file():
        listed = _read_json(folder / SAVED_DICT)
        splits = listed.get("splits") if isinstance(listed, dict) else None
        if not isinstance(splits, list) or not all(isinstance(x, str) and x for x in splits):
            raise not_saved(f"its {SAVED_DICT} has no list of splits")
        parts = {x: folder / x for x in splits}
    elif all((folder / f).is_file() for f in SAVED_FILES):
        parts = {"train": folder}  # one Dataset: trained on, val held out by dataset.val_fraction
    else:
        raise not_saved(f"it has neither {SAVED_DICT} nor {' and '.join(SAVED_FILES)}")
    if split is not None:
        if split not in parts:
            msg = f"dataset {name!r} has no split {split!r} (it has: {', '.join(sorted(parts))})"
            raise SpkdError("dataset_split_not_found", msg, "dataset.split")
        used = {split: parts[split]}
    else:
        used = {k: v for k, v in parts.items() if scan.split_of(k) is not None}
        if not any(scan.split_of(k) == "train" for k in used):
            msg = (
                f"dataset {name!r} has no train split (it has: {', '.join(sorted(parts))}): name the "
                "split to train on with dataset.split"
            )
            raise SpkdError("dataset_split_not_found", msg, "dataset.split")
    for part, where in sorted(used.items()):
        info = _read_json(where / SAVED_FILES[0])
        features = info.get("features") if isinstance(info, dict) else None
        if not isinstance(features, dict) or not (where / SAVED_FILES[1]).is_file():
            raise not_saved(f"split {part!r} has no readable {SAVED_FILES[0]} and {SAVED_FILES[1]}")
        _check_feature(features, image_col, "Image", name, "dataset.image_column")
        _check_feature(features, label_col, "ClassLabel", name, "dataset.label_column")


def _check_feature(features: dict[str, Any], column: str, kind: str, name: str, field: str) -> None:
    if column not in features:
        msg = f"dataset {name!r} has no column {column!r} (columns: {', '.join(features)})"
        raise SpkdError("dataset_column_not_found", msg, field)
    found = features[column].get("_type") if isinstance(features[column], dict) else None
    if found == kind:
        return
    if kind == "ClassLabel":
        msg = f"column {column!r} of {name!r} is not a ClassLabel (it is {found or 'a nested feature'})"
        raise SpkdError("dataset_not_classification", msg, field)
    msg = f"column {column!r} of {name!r} is not an Image feature (it is {found or 'a nested feature'})"
    raise SpkdError("dataset_column_not_image", msg, field)


def _listing(folder: Path) -> list[Path]:
    """The entries of `folder` the scanner looks at (hidden and system names left out); [] when
    it cannot be read."""
    try:
        with os.scandir(folder) as it:
            return [
                Path(e.path) for e in it if not e.name.startswith(".") and e.name not in scan.IGNORED_NAMES
            ]
    except OSError:
        return []


def check_image_folder(folder: Path, raw: str) -> None:
    """`dataset.path` naming a `save_to_disk` folder: SpkdError `dataset_not_imagefolder` (field
    `dataset.path`; such a folder is named by dataset.hf). Whether the images make a dataset is
    the scanner's to say (common/scan.py): it decodes every image, at the worker."""
    if _is_saved(folder):
        raise SpkdError(
            "dataset_not_imagefolder",
            f"dataset.path {raw!r} is a Hugging Face dataset saved with save_to_disk, not a folder of "
            "images: name it with dataset.hf",
            "dataset.path",
        )
