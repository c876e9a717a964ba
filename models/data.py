"""Datasets: scan an ImageFolder (rejecting what does not decode, with reasons), split it, and
serve augmented views as UN-normalised uint8 batches.

Batches are (images uint8 B x 3 x S x S, labels, sample indices). Normalisation happens on the
device, per model (teacher and student may use different mean/std), so both see the same view,
and any other iterable of such triples (a GPU-side data path, a cache) can replace the loader.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from models.errors import SpkdError

SPLIT_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
SYSTEM_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}
TRAIN_SCALE = (0.25, 1.0)  # random-resized-crop area: gentler than ImageNet's 0.08 for fine-tuning

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass
class DatasetScan:
    """The three roles of the data: `train` (gradient steps), `select` (every choice: best epoch,
    weights, shipped student) and `val`, the report split (the accuracies shown). Disjoint."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]  # the report split: val/, or test/ when the dataset has one
    rejected: list[dict[str, str]] = field(default_factory=list)
    split: str = "folders"  # "folders": train/ and val/ given; "seeded": split here by seed
    select: list[Sample] = field(default_factory=list)  # empty: no selection, last epoch ships
    roles: dict[str, str] = field(
        default_factory=lambda: {"train": "train/", "selection": "none", "report": "val/"}
    )

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}}; "selection" only when there is a selection split."""
        out = {}
        splits = [("train", self.train), ("val", self.val)]
        if self.select:
            splits.append(("selection", self.select))
        for split, samples in splits:
            per = Counter(s.label for s in samples)
            out[split] = {name: per.get(i, 0) for i, name in enumerate(self.classes)}
        return out

    def sizes(self) -> dict[str, int]:
        """Images per role: train, selection, report."""
        return {"train": len(self.train), "selection": len(self.select), "report": len(self.val)}

    def summary(self) -> dict:
        return {
            "classes": self.classes,
            "counts": self.counts(),
            "rejected": self.rejected,
            "split": self.split,
            "roles": self.roles,
            "sizes": self.sizes(),
        }


# ----------------------------------------------------------------------------------- checking
def check_image(path: Path) -> str | None:
    """None when the file decodes as an image, else the reason it does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every block
                img.load()
                if img.width < 1 or img.height < 1:
                    return "empty image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image too large (decompression-bomb guard)"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated / corrupt data
        return f"corrupt image: {exc}"
    return None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not _is_system(p))


def _is_system(path: Path) -> bool:
    return path.name in SYSTEM_NAMES or path.name.startswith(".")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _scan_classes(root: Path, base: Path) -> tuple[dict[str, list[Path]], list[dict[str, str]]]:
    """{class: [good files]} and the rejected files of one split folder."""
    found: dict[str, list[Path]] = {}
    rejected: list[dict[str, str]] = []
    candidates: list[tuple[str, Path]] = []
    for entry in sorted(root.iterdir()):
        if entry.is_file() and not _is_system(entry):
            rejected.append({"path": str(entry.relative_to(base)), "reason": "file outside a class folder"})
    for cls_dir in _class_dirs(root):
        found[cls_dir.name] = []
        for path in _files(cls_dir):
            rel = str(path.relative_to(base))
            if any(_is_system(Path(part)) for part in path.relative_to(cls_dir).parts):
                rejected.append({"path": rel, "reason": "system file"})
            elif path.is_symlink():
                rejected.append({"path": rel, "reason": "symbolic link"})
            else:
                candidates.append((cls_dir.name, path))
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        reasons = list(pool.map(lambda item: check_image(item[1]), candidates))
    for (cls, path), reason in zip(candidates, reasons, strict=True):
        if reason is None:
            found[cls].append(path)
        else:
            rejected.append({"path": str(path.relative_to(base)), "reason": reason})
    return found, rejected


def _find_split(root: Path, split: str) -> Path | None:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


# ----------------------------------------------------------------------------------- scanning
_SCAN_CACHE: dict[tuple, DatasetScan] = {}


def scan_dataset(root: Path, val_fraction: float = 0.2, seed: int = 0) -> DatasetScan:
    """Scan once per process (validation and the run share it); raise SpkdError if unusable."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise SpkdError("dataset_not_found", f"dataset folder {str(root)!r} does not exist", "dataset")
    key = (str(root), root.stat().st_mtime_ns, val_fraction, seed)
    if key not in _SCAN_CACHE:
        _SCAN_CACHE[key] = _scan(root, val_fraction, seed)
    return _SCAN_CACHE[key]


def _scan(root: Path, val_fraction: float, seed: int) -> DatasetScan:
    train_dir, val_dir = _find_split(root, "train"), _find_split(root, "val")
    test_dir = _find_split(root, "test")
    select_files: dict[str, list[Path]] = {}
    roles = {"train": "train/", "selection": "none", "report": "val/"}
    if train_dir is not None and test_dir is not None:
        # test/ is the report split; val/ (when present) is the selection split
        train_files, rejected = _scan_classes(train_dir, root)
        val_files, rejected_val = _scan_classes(test_dir, root)
        rejected += rejected_val
        if val_dir is not None:
            select_files, rejected_sel = _scan_classes(val_dir, root)
            rejected += rejected_sel
            roles["selection"] = f"{val_dir.name}/"
        roles["report"] = f"{test_dir.name}/"
        split = "folders"
    elif train_dir is not None and val_dir is not None:
        train_files, rejected = _scan_classes(train_dir, root)
        val_files, rejected_val = _scan_classes(val_dir, root)
        rejected += rejected_val
        split = "folders"
    else:
        all_files, rejected = _scan_classes(train_dir or root, root)
        train_files, val_files = _seeded_split(all_files, val_fraction, seed)
        split = "seeded"
        roles["report"] = f"seeded {val_fraction:g} of the images"
    classes = sorted(train_files)
    _check_classes(classes, train_files, val_files)
    index = {c: i for i, c in enumerate(classes)}
    for split_files in (val_files, select_files):
        for cls in sorted(set(split_files) - set(classes)):
            for path in split_files[cls]:
                rejected.append(
                    {"path": str(path.relative_to(root)), "reason": f"class {cls!r} is not in train/"}
                )
    train = [Sample(str(p), index[c]) for c in classes for p in train_files[c]]
    val = [Sample(str(p), index[c]) for c in classes for p in val_files.get(c, [])]
    select = [Sample(str(p), index[c]) for c in classes for p in select_files.get(c, [])]
    if not select:
        roles["selection"] = "none"
    return DatasetScan(
        classes=classes, train=train, val=val, rejected=rejected, split=split, select=select, roles=roles
    )


def with_selection(scan: DatasetScan, fraction: float, seed: int) -> DatasetScan:
    """The scan with a selection split: val/ when the dataset has test/ (already set), else a
    stratified, seeded `fraction` of train carved out (at least one image of every class that has
    two or more). fraction 0: no selection split (the last epoch ships, no choice is made).

    The carving depends only on (seed, class, file list): the same seed gives the same split.
    """
    if scan.select or fraction <= 0:
        return scan
    keep: list[Sample] = []
    select: list[Sample] = []
    for label in range(len(scan.classes)):
        members = [s for s in scan.train if s.label == label]
        order = list(members)
        random.Random(f"select:{seed}:{scan.classes[label]}").shuffle(order)
        n = min(max(1, int(round(len(order) * fraction))), len(order) - 1) if len(order) > 1 else 0
        chosen = {s.path for s in order[:n]}
        select += [s for s in members if s.path in chosen]
        keep += [s for s in members if s.path not in chosen]
    roles = {**scan.roles, "selection": f"{fraction:g} of train/ (stratified, seed {seed})"}
    return dataclasses.replace(scan, train=keep, select=select, roles=roles)


def _seeded_split(files: dict[str, list[Path]], val_fraction: float, seed: int):
    """Per-class shuffle with a seeded RNG: the same seed always gives the same split."""
    train, val = {}, {}
    for cls, paths in files.items():
        order = list(paths)
        random.Random(f"{seed}:{cls}").shuffle(order)
        n_val = int(round(len(order) * val_fraction)) if len(order) > 1 else 0
        n_val = min(max(n_val, 1 if len(order) > 1 else 0), len(order) - 1) if order else 0
        val[cls], train[cls] = sorted(order[:n_val]), sorted(order[n_val:])
    return train, val


def _check_classes(classes: list[str], train: dict, val: dict) -> None:
    if len(classes) < 2:
        raise SpkdError(
            "too_few_classes",
            f"a dataset needs at least 2 class folders with images, found {len(classes)}"
            + (f" ({classes[0]!r})" if classes else ""),
            "dataset",
        )
    empty = [c for c in classes if not train[c]]
    if empty:
        raise SpkdError(
            "empty_class", f"no usable training image in class folder(s): {', '.join(empty)}", "dataset"
        )
    if not any(val.get(c) for c in classes):
        raise SpkdError("empty_val", "the validation split has no usable image", "dataset")


# ------------------------------------------------------------------------------------ loading
def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: Pillow's convert() clips at 255 (a white image); keep the top 8 bits.
            img = img.point(lambda v: v * (1 / 256)).convert("L")
        return img.convert("RGB")  # palette / grayscale / CMYK / 16-bit all end as 8-bit RGB


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 image 3 x S x S, label, index) per sample; `transform` ends in a uint8 tensor."""

    def __init__(self, samples: list[Sample], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return self.transform(load_rgb(sample.path)), sample.label, index


def make_transform(image_size: int, data_cfg, training: bool):
    """timm's train / eval transforms for the student's data config, without normalisation."""
    from timm.data import create_transform

    return create_transform(
        image_size,
        is_training=training,
        scale=TRAIN_SCALE if training else None,
        interpolation=data_cfg.interpolation,
        crop_pct=data_cfg.crop_pct,
        crop_mode=data_cfg.crop_mode,
        normalize=False,
    )


def default_workers(requested: int | None) -> int:
    if requested is not None:
        return requested
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    training: bool,
    seed: int,
    epoch: int,
    num_workers: int,
    pin_memory: bool = False,
) -> Iterable[Batch]:
    """A loader whose shuffle and augmentation depend only on (seed, epoch): resumable exactly."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training,
        drop_last=training and len(dataset) >= batch_size,  # BN and SP need more than 1 sample
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W on the device -> float, normalised with one model's mean/std."""
    return (images.float().div_(255.0) - mean) / std
