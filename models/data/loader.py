"""Datasets: scan an ImageFolder (common/scan.py decides classes, splits and rejections, the same
rules as the upload), give its splits the job's roles (train, selection, report: `DatasetScan`),
and serve augmented views as UN-normalised uint8 batches.

A `Batch` unpacks as (images uint8 B x 3 x S x S, labels, sample indices). Normalisation happens
on the device, per model (teacher and student may use different mean/std), so both see the same
view, and any other source of Batches (the in-memory path, the teacher cache) can replace the loader.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from spkd.common import decode
from spkd.common.errors import SpkdError
from spkd.common.scan import Sample, check_image, count_per_class, scan_tree, seeded_split

__all__ = ["Batch", "DatasetScan", "Sample", "check_image", "load_rgb", "normalize_batch", "scan_dataset"]

TRAIN_SCALE = (0.25, 1.0)  # random-resized-crop area: gentler than ImageNet's 0.08 for fine-tuning


@dataclass
class Batch:
    """What every batch source yields (the DataLoader below, the in-memory sources of
    models/data/inmemory.py, the teacher cache): uint8 images, labels, dataset indices and, for an
    augmented in-memory view, the crop that made it. Unpacks as (images, labels, indices)."""

    images: torch.Tensor  # (B, 3, S, S) uint8
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64, CPU: positions in the dataset
    boxes: torch.Tensor | None = None  # (B, 4) crop boxes, CPU (in-memory train views only)
    flips: torch.Tensor | None = None  # (B,) bool, CPU (in-memory train views only)
    jitter: torch.Tensor | None = None  # (B, 3) colour factors, CPU (in-memory train views only)

    def __iter__(self):
        """Unpacks as the engine's (images, labels, indices) triple."""
        return iter((self.images, self.labels, self.indices))


@dataclass
class DatasetScan:
    """A job's data in its three roles (docs/architecture.md#5-data-roles-the-honest-protocol),
    disjoint: `train` (gradient steps), `selection` (every choice: best epoch, weights, the
    shipped student) and `report` (the accuracies shown). common.scan decides classes, folders and
    rejections; with a test/ split, test/ is reported and val/ selects; otherwise val/ (or a
    seeded share of train, `report_from` "seeded") is reported and `with_selection` carves the
    selection split out of train."""

    classes: list[str]
    train: list[Sample]
    report: list[Sample]  # test/ when the dataset has one, else val/, else a seeded share of train
    rejected: list[dict[str, str]] = field(default_factory=list)
    report_from: str = "folders"  # "folders": the report split is a folder; "seeded": held out here
    selection: list[Sample] = field(default_factory=list)  # empty: no selection, last epoch ships
    roles: dict[str, str] = field(
        default_factory=lambda: {"train": "train/", "selection": "none", "report": "val/"}
    )
    layout: str = "split"  # common.scan: "split" (split folders) or "flat" (class folders)
    # the part of the selection split held out of every other choice to decide which student ships
    # (`with_ship_part`); disjoint from `selection`, which then only picks epochs and weights
    ship: list[Sample] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}}: "train", "val" (the report split, under the key metrics.json
        and the dataset event have always used) and "selection" (both of its parts) when there is a
        selection split."""
        splits = [("train", self.train), ("val", self.report)] + (
            [("selection", self.selection + self.ship)] if self.selection else []
        )
        return {split: count_per_class(samples, self.classes) for split, samples in splits}

    def sizes(self) -> dict[str, int]:
        """Images per role: train, selection (both of its parts), report; with a ship part also
        `selection_pick` (best epochs, weights) and `selection_ship` (the shipped student)."""
        out = {
            "train": len(self.train),
            "selection": len(self.selection) + len(self.ship),
            "report": len(self.report),
        }
        if self.ship:
            out |= {"selection_pick": len(self.selection), "selection_ship": len(self.ship)}
        return out

    def summary(self) -> dict:
        """The dataset block of metrics.json and of the `dataset` event."""
        return {
            "classes": self.classes,
            "counts": self.counts(),
            "rejected": self.rejected,
            "split": self.report_from,
            "layout": self.layout,
            "roles": self.roles,
            "sizes": self.sizes(),
        }


# ----------------------------------------------------------------------------------- scanning
def scan_dataset(root: Path, val_fraction: float = 0.2, seed: int = 0) -> DatasetScan:
    """common.scan's verdict on the tree, in the job's roles: test/ (when present) is reported and
    val/ selects; else val/ is reported, or a seeded `val_fraction` of train when the tree has no
    val/. A job's validation scans its dataset once (models/training/validation.py `ValidJob`).
    Raises SpkdError `dataset_not_found` (no such folder), or common.scan's refusals."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise SpkdError("dataset_not_found", f"dataset folder {str(root)!r} does not exist", "dataset")
    found = scan_tree(root)
    roles = {"train": "train/", "selection": "none", "report": "val/"}
    train, selection, report_from = found.train, [], "folders"
    if "test" in found.folders:
        report = found.test
        roles["report"] = "test/"
        if "val" in found.folders:
            selection, roles["selection"] = found.val, "val/"
    elif "val" in found.folders:
        report = found.val
    else:
        train, report = seeded_split(found.train, found.classes, val_fraction, seed)
        report_from, roles["report"] = "seeded", f"seeded {val_fraction:g} of the images"
    if not report:
        raise SpkdError(
            "empty_split", "the report split has no usable image (every class has one image)", "dataset"
        )
    return DatasetScan(
        classes=found.classes,
        train=train,
        report=report,
        rejected=found.rejected,
        report_from=report_from,
        selection=selection,
        roles=roles,
        layout=found.layout,
    )


def with_selection(scan: DatasetScan, fraction: float, seed: int) -> DatasetScan:
    """The scan with a selection split: val/ when the dataset has test/ (already set), else a
    stratified, seeded `fraction` of train carved out (at least one image of every class that has
    two or more). fraction 0: no selection split (the last epoch ships, no choice is made).

    The carving depends only on (seed, class, file list): the same seed gives the same split.
    """
    if scan.selection or fraction <= 0:
        return scan

    def share(n: int) -> int:  # at least one, never all: a class keeps a training image
        return min(max(1, int(round(n * fraction))), n - 1) if n > 1 else 0

    keep, selection = _stratified_draw(scan.train, scan.classes, share, f"select:{seed}")
    roles = {**scan.roles, "selection": f"{fraction:g} of train/ (stratified, seed {seed})"}
    return dataclasses.replace(scan, train=keep, selection=selection, roles=roles)


def with_ship_part(scan: DatasetScan, fraction: float, seed: int) -> DatasetScan:
    """The scan with its selection split cut in two disjoint parts: `selection` keeps picking every
    student's best epoch (and the SP/KD weights), `ship` (a stratified, seeded `fraction` of it:
    floor(n x fraction) images of each class, so a class with one selection image stays in `selection`)
    only decides which student ships. A choice judged on the images that made it is biased towards
    whichever student got luckier on them (a winner's curse); the ship part never fed a choice.

    fraction 0, no selection split, or no image left for a part: the scan as it is (the whole
    selection split picks epochs and decides). Depends only on (seed, class, file list).
    """
    if not scan.selection or fraction <= 0 or scan.ship:
        return scan
    keep, ship = _stratified_draw(scan.selection, scan.classes, lambda n: int(n * fraction), f"ship:{seed}")
    if not ship or not keep:
        return scan
    roles = {
        **scan.roles,
        "selection": f"{scan.roles['selection']}; {fraction:g} of it decides the shipped student",
    }
    return dataclasses.replace(scan, selection=keep, ship=ship, roles=roles)


def _stratified_draw(
    samples: list[Sample], classes: list[str], count: Callable[[int], int], salt: str
) -> tuple[list[Sample], list[Sample]]:
    """(kept, drawn): per class, `count(n)` of its n samples drawn after a shuffle seeded by
    `salt` and the class name, so the draw depends only on (salt, class, file list). Both lists
    keep the samples' order (class by class)."""
    keep: list[Sample] = []
    drawn: list[Sample] = []
    for label, name in enumerate(classes):
        members = [s for s in samples if s.label == label]
        order = list(members)
        random.Random(f"{salt}:{name}").shuffle(order)
        chosen = {s.path for s in order[: count(len(order))]}
        drawn += [s for s in members if s.path in chosen]
        keep += [s for s in members if s.path not in chosen]
    return keep, drawn


# ------------------------------------------------------------------------------------ loading
def load_rgb(path: str) -> Image.Image:
    """8-bit RGB pixels of an image file: common.decode's policy, shared by every data path."""
    return decode.load_rgb(path)


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
    data = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training,
        drop_last=training and len(dataset) >= batch_size,  # BN and SP need more than 1 sample
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return _Batches(data)


class _Batches:
    """A DataLoader's [images, labels, indices] lists (collated, pinned) as `Batch`es."""

    def __init__(self, data: torch.utils.data.DataLoader) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Batch]:
        return (Batch(images, labels, indices) for images, labels, indices in self.data)


def normalize_batch(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W on the device -> float, normalised with one model's mean/std."""
    return (images.float().div_(255.0) - mean) / std
