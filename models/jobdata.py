"""A job's data as the stages use it: its splits, transforms and data configs, served as batches
from the in-memory fast path (models/fastpath.py) when it fits, else from a DataLoader
(models/data.py). Batches are (uint8 images B x 3 x S x S, labels, indices) either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from common.reporter import Reporter
from common.spec import JobSpec
from models import data, factory, fastpath
from models.bank import BANK, ModelKey
from models.engine import Runtime
from models.factory import DataConfig


@dataclass
class JobData:
    spec: JobSpec
    image_size: int
    student_cfg: DataConfig  # the student's normalisation and crop: every split's transform
    teacher_cfg: DataConfig  # the teacher's normalisation (applied on the device)
    train_set: data.ImageDataset
    val_set: data.ImageDataset  # the report split
    select_set: data.ImageDataset | None  # the selection split; None: selection off
    runtime: Runtime
    fast: fastpath.FastPath | None = None  # in-memory data path + teacher cache

    @property
    def selecting(self) -> bool:
        """Whether choices (best epoch, weights, shipped student) are made on a selection split."""
        return self.select_set is not None

    @property
    def choice_split(self) -> str:
        """The split every epoch is scored on: selection, or the report split when selection is off."""
        return "selection" if self.selecting else "report"

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.train_set), self.spec.train.batch_size
        return n // b if n >= b else math.ceil(n / b)

    def cfg_for(self, stage: str) -> DataConfig:
        """The data config of the model a training stage trains."""
        return self.teacher_cfg if stage == "teacher_finetune" else self.student_cfg

    def eval_batches(self, split: str) -> Callable[[], Iterable[data.Batch]]:
        """() -> batches of the `selection` or `report` split (eval transform, fixed order)."""
        fast = self.fast.eval_batches(split) if self.fast is not None else None
        if fast is not None:
            return fast
        dataset = self.select_set if split == "selection" and self.select_set is not None else self.val_set
        return lambda: self._loader(dataset, training=False)

    def loaders(self, stage: str | None = None) -> fastpath.Loaders:
        """(train_batches(epoch), val_batches()) for a training stage; val is the choice split.

        `stage` "distill" may get the teacher cache's batches (the views it was built on)."""
        fast = self.fast.loaders(stage) if self.fast is not None else None
        train_batches = fast[0] if fast is not None else None  # decoded once, augmented on the device
        if train_batches is None:

            def train_batches(epoch: int):
                return self._loader(self.train_set, training=True, epoch=epoch)

        return train_batches, self.eval_batches(self.choice_split)

    def _loader(self, dataset: data.ImageDataset, training: bool, epoch: int = 0):
        spec = self.spec
        return data.make_loader(
            dataset,
            spec.train.batch_size,
            training=training,
            seed=spec.train.seed,
            epoch=epoch,
            num_workers=data.default_workers(spec.train.num_workers),
            pin_memory=self.runtime.is_cuda,
        )


def open_data(
    spec: JobSpec, scan: data.DatasetScan, runtime: Runtime, reporter: Reporter, data_path: str = "auto"
) -> JobData:
    """The job's datasets; data configs read from the job's built models (models/bank.py)."""
    image_size = factory.job_image_size(spec)
    student, _ = BANK.probe(ModelKey.of(spec, "student", scan.classes, image_size))
    teacher, _ = BANK.probe(ModelKey.of(spec, "teacher", scan.classes, image_size))
    student_cfg = factory.data_config(student, image_size)
    teacher_cfg = factory.data_config(teacher, image_size)
    train_set = data.ImageDataset(scan.train, data.make_transform(image_size, student_cfg, training=True))
    eval_transform = data.make_transform(image_size, student_cfg, training=False)
    val_set = data.ImageDataset(scan.val, eval_transform)
    return JobData(
        spec=spec,
        image_size=image_size,
        student_cfg=student_cfg,
        teacher_cfg=teacher_cfg,
        train_set=train_set,
        val_set=val_set,
        select_set=data.ImageDataset(scan.select, eval_transform) if scan.select else None,
        runtime=runtime,
        fast=fastpath.FastPath(
            spec,
            scan,
            runtime.device,
            image_size,
            eval_transform,
            reporter,
            runtime.amp_dtype,
            disabled=data_path == "loader",
        ),
    )
