"""A job's data as the stages use it: its splits, transforms and data configs (`JobData`), served
as batches from memory when the decoded dataset fits (`FastPath`, below: models/data/inmemory.py,
decode once, augment on the device), else from the engine's multi-worker DataLoader
(models/data/loader.py). Batches are (uint8 images B x 3 x S x S, labels, indices) either way.

`FastPath` is also where the distill stage gets its teacher: when the job's `distill.teacher_cache`
allows it and the features fit, the teacher is run once over `distill.teacher_views` views per
image and the stage trains on exactly those views (models/training/teacher_cache.py).

`disabled=True` (run_job's `data_path="loader"`, SPKD_DATA_PATH for the service) forces the
DataLoader, for debugging or comparing the two paths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from spkd.common.reporter import Reporter
from spkd.common.spec import JobSpec
from spkd.models import methods
from spkd.models.data import inmemory, loader
from spkd.models.networks import factory
from spkd.models.networks.bank import ModelBank, ModelKey
from spkd.models.networks.factory import DataConfig
from spkd.models.training import teacher_cache
from spkd.models.training.engine import Runtime

Loaders = tuple[Callable[[int], Iterable], Callable[[], Iterable]]


@dataclass
class JobData:
    spec: JobSpec
    image_size: int
    student_cfg: DataConfig  # the student's normalisation and crop: every split's transform
    teacher_cfg: DataConfig  # the teacher's normalisation (applied on the device)
    train_set: loader.ImageDataset
    report_set: loader.ImageDataset
    selection_set: loader.ImageDataset | None  # the selection split (its pick part); None: selection off
    runtime: Runtime
    fast: FastPath | None = None  # in-memory data path + teacher cache
    ship_set: loader.ImageDataset | None = None  # the selection split's ship part; None: none carved
    teacher_size: int = 0  # the teacher's input size (teacher.image_size resolved); 0: image_size
    _sets: dict[tuple[str, int], loader.ImageDataset] = field(default_factory=dict, repr=False)

    @property
    def selecting(self) -> bool:
        """Whether choices (best epoch, weights, shipped student) are made on a selection split."""
        return self.selection_set is not None

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

    @property
    def teacher_image_size(self) -> int:
        """The teacher's input size in px (teacher.image_size resolved)."""
        return self.teacher_size or self.image_size

    def model_size(self, stage: str) -> int:
        """The input size in px of the model a training stage trains (and evaluates)."""
        return self.teacher_image_size if stage == "teacher_finetune" else self.image_size

    def view_size(self, stage: str | None) -> int:
        """The size in px of a stage's train batches: the distill stage's one augmented view is
        made at the larger of the two models' sizes and each model's Normalizer resizes it to its
        own, so teacher and student see the same crop and flip."""
        if stage == "distill":
            return max(self.image_size, self.teacher_image_size)
        return self.model_size(stage or "")

    def eval_batches(self, split: str, size: int | None = None) -> Callable[[], Iterable[loader.Batch]]:
        """() -> batches of the `selection`, `ship` or `report` split (eval transform, fixed order);
        `ship` is the report split when no ship part was carved (callers check `ship_set`).
        `size`: the teacher's size when it differs from image_size (the teacher's eval transform,
        from disk); None: image_size."""
        dataset = {"selection": self.selection_set, "ship": self.ship_set}.get(split) or self.report_set
        if size is not None and size != self.image_size:
            sized = self._sized(dataset, size, self.teacher_cfg, training=False)
            return lambda: self._loader(sized, training=False)
        fast = self.fast.eval_batches(split) if self.fast is not None else None
        if fast is not None:
            return fast
        return lambda: self._loader(dataset, training=False)

    def loaders(self, stage: str | None = None) -> Loaders:
        """(train_batches(epoch), eval_batches()) for a training stage; eval is the choice split at
        the trained model's size, train batches are at `view_size(stage)`.

        `stage` "distill" may get the teacher cache's batches (the views it was built on)."""
        size = self.view_size(stage)
        fast = self.fast.loaders(stage, size) if self.fast is not None else None
        train_batches = fast[0] if fast is not None else None  # decoded once, augmented on the device
        if train_batches is None:
            train_set = self._sized(self.train_set, size, self.student_cfg, training=True)

            def train_batches(epoch: int):
                return self._loader(train_set, training=True, epoch=epoch)

        return train_batches, self.eval_batches(self.choice_split, self.model_size(stage or ""))

    def _sized(
        self, dataset: loader.ImageDataset, size: int, cfg: DataConfig, training: bool
    ) -> loader.ImageDataset:
        """`dataset`'s samples with a transform at `size` (itself at image_size); made once."""
        if size == self.image_size:
            return dataset
        key = (f"{id(dataset)}:{training}", size)
        if key not in self._sets:
            self._sets[key] = loader.ImageDataset(dataset.samples, loader.make_transform(size, cfg, training))
        return self._sets[key]

    def _loader(self, dataset: loader.ImageDataset, training: bool, epoch: int = 0):
        spec = self.spec
        return loader.make_loader(
            dataset,
            spec.train.batch_size,
            training=training,
            seed=spec.train.seed,
            epoch=epoch,
            num_workers=loader.default_workers(spec.train.num_workers),
            pin_memory=self.runtime.is_cuda,
        )


def open_data(
    spec: JobSpec,
    scan: loader.DatasetScan,
    models: ModelBank,
    runtime: Runtime,
    reporter: Reporter,
    data_path: str = "auto",
) -> JobData:
    """The job's datasets; data configs read from the job's built `models`."""
    image_size = factory.job_image_size(spec)
    teacher_size = factory.teacher_image_size(spec)
    student, _ = models.probe(ModelKey.of(spec, "student", scan.classes, image_size))
    teacher, _ = models.probe(ModelKey.of(spec, "teacher", scan.classes, teacher_size))
    student_cfg = factory.data_config(student, image_size)
    teacher_cfg = factory.data_config(teacher, teacher_size)
    train_set = loader.ImageDataset(scan.train, loader.make_transform(image_size, student_cfg, training=True))
    eval_transform = loader.make_transform(image_size, student_cfg, training=False)
    report_set = loader.ImageDataset(scan.report, eval_transform)
    return JobData(
        spec=spec,
        image_size=image_size,
        student_cfg=student_cfg,
        teacher_cfg=teacher_cfg,
        train_set=train_set,
        report_set=report_set,
        selection_set=loader.ImageDataset(scan.selection, eval_transform) if scan.selection else None,
        ship_set=loader.ImageDataset(scan.ship, eval_transform) if scan.ship else None,
        runtime=runtime,
        teacher_size=teacher_size,
        fast=FastPath(
            spec,
            scan,
            runtime.device,
            image_size,
            eval_transform,
            reporter,
            runtime.amp_dtype,
            disabled=data_path == "loader",
            teacher_size=teacher_size,
        ),
    )


# ------------------------------------------------------------------------- in memory
@dataclass
class FastPath:
    """Per-run state: the decoded train, report and selection stores (made on first use) and the
    teacher cache."""

    spec: JobSpec
    scan: loader.DatasetScan
    device: torch.device
    image_size: int
    eval_transform: Any  # the pipeline's own eval transform (uint8 out): identical eval tensors
    reporter: Reporter
    amp_dtype: torch.dtype | None = None
    train: inmemory.TrainSource | None = None
    report: inmemory.EvalSource | None = None
    selection: inmemory.EvalSource | None = None  # the selection split (its pick part), when the job has one
    ship: inmemory.EvalSource | None = None  # the selection split's ship part, when carved
    cache: teacher_cache.TeacherCache | None = None
    disabled: bool = False
    teacher_size: int = 0  # the teacher's input size; 0: image_size
    _tried: bool = field(default=False, repr=False)

    # ------------------------------------------------------------------------------ batches
    def loaders(self, stage: str | None, size: int | None = None) -> Loaders | None:
        """(train_batches(epoch), eval_batches()) from memory, or None: use the DataLoader. Train
        views are made at `size` (None: image_size). The eval batches are the report split's:
        JobData.loaders asks for the choice split itself."""
        if not self._ready():
            return None
        train, report = self.train_at(size or self.image_size), self.report
        assert report is not None
        cache = self.cache if stage == "distill" else None
        train_batches = cache.epoch if cache is not None else train.epoch
        return train_batches, report.epoch

    def train_at(self, size: int) -> inmemory.TrainSource:
        """The train source with views at `size` px: the same store, permutation and views."""
        assert self.train is not None
        if size == self.train.image_size:
            return self.train
        t = self.train
        return inmemory.TrainSource(
            t.store, t.sizes, size, t.batch_size, t.seed, t.drop_last, t.augment, t.min_batch
        )

    def eval_batches(self, split: str) -> Callable[[], Iterable] | None:
        """The `selection`, `ship` or `report` split's batches from memory, or None: use the DataLoader."""
        if not self._ready():
            return None
        source = {"selection": self.selection, "ship": self.ship}.get(split, self.report)
        return source.epoch if source is not None else None

    def _ready(self) -> bool:
        if self.disabled:
            return False
        if not self._tried:
            self._tried = True
            self._build_sources()
        return self.train is not None and self.report is not None

    def _build_sources(self) -> None:
        spec = self.spec
        size, bs = self.image_size, spec.train.batch_size
        # the store serves the larger model's views too (distill: one view for both models)
        store_size = inmemory.store_size_for(max(size, self.teacher_size))
        n_train = len(self.scan.train)
        n_eval = len(self.scan.report) + len(self.scan.selection) + len(self.scan.ship)
        need = inmemory.image_store_bytes(n_train, store_size)
        need += inmemory.image_store_bytes(n_eval, size)
        plan = inmemory.plan_memory(need, self.device)
        if plan.placement == "loader":
            self.reporter.event("info", f"data: streaming from disk with a DataLoader ({plan.describe()})")
            self.disabled = True
            return
        start = time.perf_counter()
        workers = spec.train.num_workers or None
        on_gpu = plan.placement == "gpu"
        images, sizes = inmemory.decode_train_images([s.path for s in self.scan.train], store_size, workers)
        labels = torch.tensor([s.label for s in self.scan.train])
        store = inmemory.ImageStore(images, labels, self.device, on_gpu)
        augment = inmemory.Augment(scale=loader.TRAIN_SCALE)
        drop_last = n_train >= bs  # as the DataLoader: BN and SP need more than one sample
        self.train = inmemory.TrainSource(store, sizes, size, bs, spec.train.seed, drop_last, augment)
        self.report = self._eval_source(self.scan.report, workers, on_gpu)
        if self.scan.selection:
            self.selection = self._eval_source(self.scan.selection, workers, on_gpu)
        if self.scan.ship:
            self.ship = self._eval_source(self.scan.ship, workers, on_gpu)
        seconds = time.perf_counter() - start
        self.reporter.event(
            "info",
            f"data: decoded {n_train + n_eval} images once in {seconds:.1f}s, augmenting on {self.device} "
            f"({plan.describe()})",
            data_path=plan.placement,
            decode_seconds=round(seconds, 3),
        )

    def _eval_source(self, samples: list[loader.Sample], workers: int | None, on_gpu: bool):
        images = inmemory.decode_eval_images([s.path for s in samples], self.eval_transform, workers)
        labels = torch.tensor([s.label for s in samples])
        store = inmemory.ImageStore(images, labels, self.device, on_gpu)
        return inmemory.EvalSource(store, self.spec.train.batch_size)

    # ------------------------------------------------------------------------------ teacher
    def teacher(self, live: Callable[[torch.Tensor, torch.Tensor], Any]) -> Callable:
        """The distill stage's teacher: the cache when it is on and fits, else `live` itself."""
        mode = self.spec.distill.teacher_cache
        views, epochs = self.spec.distill.teacher_views, self.spec.train.epochs
        if mode == "off" or not self._ready():
            if mode == "on":
                self.reporter.event("warning", "teacher cache needs the in-memory data path: live teacher")
            return live
        if mode == "auto" and views >= epochs:
            self.reporter.event(
                "info", f"teacher cache off: {views} views for {epochs} epochs would not save teacher passes"
            )
            return live
        assert self.train is not None
        train = self.train_at(max(self.image_size, self.teacher_size))  # the distill stage's views

        def run_teacher(x: torch.Tensor):
            return live(x, None)

        shapes, logit_dim = teacher_cache.probe_teacher(run_teacher, train)
        keep_features, keep_logits = methods.spec_needs(self.spec.distill)  # what the methods read
        numel = (sum(int(torch.Size(s).numel()) for s in shapes) if keep_features else 0) + (
            (logit_dim or 0) if keep_logits else 0
        )
        need = teacher_cache.cache_bytes(len(train.store), views, numel)
        decision = teacher_cache.decide(mode, need, self.device)
        if not decision.use:
            self.reporter.event("info", decision.reason)
            return live
        start = time.perf_counter()
        try:
            self.cache = teacher_cache.TeacherCache.build(
                train,
                run_teacher,
                views=views,
                batch_size=self.spec.train.batch_size,
                seed=self.spec.train.seed,
                dtype=torch.float16 if self.amp_dtype == torch.float16 else torch.bfloat16,
                placement=decision.placement or "host",
                keep_logits=keep_logits,
                keep_features=keep_features,
            )
        except torch.cuda.OutOfMemoryError:
            failed = True  # handled below, outside the except block that pins the tensors
        else:
            failed = False
        if failed:
            self.cache = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.reporter.event("warning", "out of GPU memory while building the teacher cache: live teacher")
            return live
        seconds = time.perf_counter() - start
        self.reporter.event(
            "info",
            f"{decision.reason}: teacher ran once over {views} views per image in {seconds:.1f}s",
            teacher_cache=True,
            views=views,
            bytes=self.cache.nbytes,
            placement=decision.placement,
            seconds=round(seconds, 3),
        )
        return self.cache
