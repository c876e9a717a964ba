"""Engine pieces the model tests build straight from image files, and a simulated GPU memory limit.

A job builds its in-memory sources in models/data/batches.py (`FastPath`) from a scanned dataset;
these build the same sources (models/data/inmemory.py) from a list of files, so a test can drive the
decode-once data path, the teacher cache and the OOM handler without a whole job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spkd.models.data import inmemory, loader
from spkd.models.networks.factory import DataConfig


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The engine's normalisation (models.data.loader.normalize_batch) with a model's mean/std as numbers."""
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return loader.normalize_batch(images, mean_t, std_t)


def train_source(
    paths: Sequence[str | Path],
    labels: Sequence[int],
    image_size: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    workers: int | None = None,
    host_budget: int | None = None,
    drop_last: bool = False,
) -> tuple[inmemory.TrainSource | None, inmemory.MemoryPlan]:
    """Decode once into memory; None (with the plan saying 'loader') when it does not fit."""
    size = inmemory.store_size_for(image_size)
    plan = inmemory.plan_memory(inmemory.image_store_bytes(len(paths), size), device, host_budget=host_budget)
    if plan.placement == "loader":
        return None, plan
    images, sizes = inmemory.decode_train_images(paths, size, workers)
    store = inmemory.ImageStore(images, torch.as_tensor(list(labels)), device, on_gpu=plan.placement == "gpu")
    return inmemory.TrainSource(store, sizes, image_size, batch_size, seed, drop_last), plan


def eval_source(
    paths: Sequence[str | Path],
    labels: Sequence[int],
    image_size: int,
    batch_size: int,
    device: torch.device,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    workers: int | None = None,
) -> tuple[inmemory.EvalSource, inmemory.MemoryPlan]:
    """The eval source of `paths` through the engine's own eval transform (loader.make_transform)."""
    plan = inmemory.plan_memory(inmemory.image_store_bytes(len(paths), image_size), device)
    assert plan.placement != "loader", plan.describe()
    cfg = DataConfig((3, image_size, image_size), (0.5,) * 3, (0.5,) * 3, interpolation, crop_pct, "center")
    transform = loader.make_transform(image_size, cfg, training=False)
    images = inmemory.decode_eval_images(paths, transform, workers)
    store = inmemory.ImageStore(images, torch.as_tensor(list(labels)), device, on_gpu=plan.placement == "gpu")
    return inmemory.EvalSource(store, batch_size), plan


class FakeMemoryLimit:
    """Forward pre-hook raising torch.cuda.OutOfMemoryError for batches above `max_batch`: drives the
    OOM handler (models/training/oom.py) through a real training step on the CPU."""

    def __init__(self, module: torch.nn.Module, max_batch: int):
        self.max_batch = max_batch
        self.triggered = 0
        # The first leaf (the stem): every path through the model runs it, whether it is called
        # as model(x) or through forward_features / forward_intermediates (feature taps).
        first = next((m for m in module.modules() if not any(m.children())), module)
        self._handle = first.register_forward_pre_hook(self._check)

    def _check(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.shape[0] > self.max_batch:
            self.triggered += 1
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (simulated limit: batch {x.shape[0]} > {self.max_batch})"
            )

    def remove(self) -> None:
        self._handle.remove()


class MemoryLimitAtStep:
    """Like FakeMemoryLimit, but raises once: at the `at`-th training forward of `module` (its
    stem in train mode with gradients on; evaluation forwards are not counted), in that forward or,
    with `backward`, in that step's backward (when the gradient reaches the stem)."""

    def __init__(self, module: torch.nn.Module, at: int, backward: bool = False):
        self.at, self.backward, self.calls, self.triggered = at, backward, 0, 0
        first = next((m for m in module.modules() if not any(m.children())), module)
        self._handle = first.register_forward_hook(self._check)

    def _raise(self, *_: Any) -> None:
        self.triggered += 1
        where = "backward" if self.backward else "forward"
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated in {where} {self.at})")

    def _check(self, module: torch.nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self.calls += 1
        if self.calls == self.at:
            if self.backward:
                out.register_hook(self._raise)
            else:
                self._raise()


def limit_stage_at_step(stage: str, at: int, backward: bool = False) -> list[MemoryLimitAtStep]:
    """Make `stage`'s student run out of memory once, at its `at`-th training step (forward, or
    backward), in this process: wraps the engine's epoch loop to hook the stage's model. Returns
    the installed limits."""
    from spkd.models.training import engine

    installed: list[MemoryLimitAtStep] = []
    train_epoch = engine._train_epoch

    def wrapped(plan, *args, **kwargs):
        if plan.name == stage and not installed:
            installed.append(MemoryLimitAtStep(plan.model, at, backward))
        return train_epoch(plan, *args, **kwargs)

    engine._train_epoch = wrapped
    return installed
