"""Where the pipeline plugs in the fast data path and the teacher-feature cache.

The stages (models/stages/) ask this module for (a) the batches of a stage and (b) the distill stage's
teacher function. When the decoded dataset fits in memory, batches come from models/fastdata.py
(decode once, augment on the device); otherwise from the engine's multi-worker DataLoader, as
before. For the distill stage, when the job's `distill.teacher_cache` allows it and the features
fit, the teacher is run once over `distill.teacher_views` views per image and the stage trains on
exactly those views (models/teacher_cache.py).

`disabled=True` (run_job's `data_path="loader"`, SPKD_DATA_PATH for the service) forces the
DataLoader, for debugging or comparing the two paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from common.reporter import Reporter
from common.spec import JobSpec
from models import data, fastdata, methods, teacher_cache

Loaders = tuple[Callable[[int], Iterable], Callable[[], Iterable]]


@dataclass
class FastPath:
    """Per-run state: the decoded train/val stores (made on first use) and the teacher cache."""

    spec: JobSpec
    scan: data.DatasetScan
    device: torch.device
    image_size: int
    eval_transform: Any  # the pipeline's own eval transform (uint8 out): identical eval tensors
    reporter: Reporter
    amp_dtype: torch.dtype | None = None
    train: fastdata.TrainSource | None = None
    val: fastdata.EvalSource | None = None
    select: fastdata.EvalSource | None = None  # the selection split, when the job has one
    cache: teacher_cache.TeacherCache | None = None
    disabled: bool = False
    _tried: bool = field(default=False, repr=False)

    # ------------------------------------------------------------------------------ batches
    def loaders(self, stage: str | None) -> Loaders | None:
        """(train_batches(epoch), val_batches()) from memory, or None: use the DataLoader."""
        if not self._ready():
            return None
        train, val = self.train, self.val
        assert train is not None and val is not None
        cache = self.cache if stage == "distill" else None
        train_batches = cache.epoch if cache is not None else train.epoch
        return train_batches, val.epoch

    def eval_batches(self, split: str) -> Callable[[], Iterable] | None:
        """The `selection` or `report` split's batches from memory, or None: use the DataLoader."""
        if not self._ready():
            return None
        source = self.select if split == "selection" else self.val
        return source.epoch if source is not None else None

    def _ready(self) -> bool:
        if self.disabled:
            return False
        if not self._tried:
            self._tried = True
            self._build_sources()
        return self.train is not None and self.val is not None

    def _build_sources(self) -> None:
        spec = self.spec
        size, bs = self.image_size, spec.train.batch_size
        n_train, n_val = len(self.scan.train), len(self.scan.val) + len(self.scan.select)
        need = fastdata.image_store_bytes(n_train, fastdata.store_size_for(size))
        need += fastdata.image_store_bytes(n_val, size)
        plan = fastdata.plan_memory(need, self.device)
        if plan.placement == "loader":
            self.reporter.event("info", f"data: streaming from disk with a DataLoader ({plan.describe()})")
            self.disabled = True
            return
        start = time.perf_counter()
        workers = spec.train.num_workers or None
        on_gpu = plan.placement == "gpu"
        images, sizes = fastdata.decode_train_images(
            [s.path for s in self.scan.train], fastdata.store_size_for(size), workers
        )
        labels = torch.tensor([s.label for s in self.scan.train])
        store = fastdata.ImageStore(images, labels, self.device, on_gpu)
        augment = fastdata.Augment(scale=data.TRAIN_SCALE)
        drop_last = n_train >= bs  # as the DataLoader: BN and SP need more than one sample
        self.train = fastdata.TrainSource(store, sizes, size, bs, spec.train.seed, drop_last, augment)
        self.val = self._eval_source(self.scan.val, workers, on_gpu)
        if self.scan.select:
            self.select = self._eval_source(self.scan.select, workers, on_gpu)
        seconds = time.perf_counter() - start
        self.reporter.event(
            "info",
            f"data: decoded {n_train + n_val} images once in {seconds:.1f}s, augmenting on {self.device} "
            f"({plan.describe()})",
            data_path=plan.placement,
            decode_seconds=round(seconds, 3),
        )

    def _eval_source(self, samples: list[data.Sample], workers: int | None, on_gpu: bool):
        images = fastdata.decode_eval_images([s.path for s in samples], self.eval_transform, workers)
        labels = torch.tensor([s.label for s in samples])
        store = fastdata.ImageStore(images, labels, self.device, on_gpu)
        return fastdata.EvalSource(store, self.spec.train.batch_size)

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

        def run_teacher(x: torch.Tensor):
            return live(x, None)

        shapes, logit_dim = teacher_cache.probe_teacher(run_teacher, self.train)
        keep_features, keep_logits = methods.spec_needs(self.spec.distill)  # what the methods read
        numel = (sum(int(torch.Size(s).numel()) for s in shapes) if keep_features else 0) + (
            (logit_dim or 0) if keep_logits else 0
        )
        need = teacher_cache.cache_bytes(len(self.train.store), views, numel)
        decision = teacher_cache.decide(mode, need, self.device)
        if not decision.use:
            self.reporter.event("info", decision.reason)
            return live
        start = time.perf_counter()
        try:
            self.cache = teacher_cache.TeacherCache.build(
                self.train,
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
