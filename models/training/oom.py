"""A batch size that fits: on CUDA out-of-memory, halve the batch and retry.

The engine runs each optimizer step through `BatchSizeController.run`. When a step raises
out-of-memory, the controller frees what the failed step held, halves the batch size, scales the
learning rate by the same factor (linear scaling rule), emits a `warning` event saying so, and
retries the same images in chunks of the new size. Batch sources read `controller.batch_size`
so later batches come at the new size directly.

On several ranks (train.devices) every rank runs the same chunks of the global batch, so all of
them must halve together: a rank that runs out tells the others at their next check point
(distributed.check_peers: before each SP gather and after the backward, where no collective is
pending), they raise PeerOutOfMemory there, and every rank halves and redoes the step. The batch
size is then the global one (`multiple`: the world size, so every rank gets an equal share).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from spkd.common.reporter import Reporter
from spkd.models.training import distributed

T = TypeVar("T")
R = TypeVar("R")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # Some allocations (cuDNN/cuBLAS workspaces) surface as a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def split_batch(batch: T, size: int) -> list[T]:
    """Chunks of at most `size` along dim 0 of every tensor sharing the batch's leading dim.

    Works on tensors, tuples/lists, dicts and dataclasses (e.g. models.data.loader.Batch) of them.
    """
    n = _leading(batch)
    if n is None or n <= size:
        return [batch]
    return [_slice(batch, s, min(n, s + size), n) for s in range(0, n, size)]


def _leading(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else None
    if isinstance(obj, dict):
        items = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, list | tuple):
        items = list(obj)
    else:
        return None
    for item in items:
        n = _leading(item)
        if n is not None:
            return n
    return None


def _slice(obj: Any, a: int, b: int, n: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[a:b] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _slice(v, a, b, n) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _slice(getattr(obj, f.name), a, b, n) for f in dataclasses.fields(obj) if f.init}
        )
    if isinstance(obj, list | tuple):
        return type(obj)(_slice(v, a, b, n) for v in obj)
    return obj


class BatchSizeController:
    """Current batch size and learning-rate scale of a training stage, shrunk on OOM."""

    def __init__(
        self,
        batch_size: int | None,
        reporter: Reporter,
        stage: str,
        min_batch_size: int = 2,
        on_change: Callable[[int], None] | None = None,
    ):
        self.batch_size = batch_size  # None: the first batch's size (times lr_scale, on resume)
        self.lr_scale = 1.0
        self.reporter = reporter
        self.stage = stage
        self.min_batch_size = min_batch_size  # SP needs at least two images
        self.on_change = on_change  # e.g. tell the batch source
        self.multiple = 1  # sizes stay multiples of it (the ranks' count: equal shares)

    def halve(
        self, optimizer: torch.optim.Optimizer, scheduler: Any = None, where: str | None = None
    ) -> None:
        """Halve the batch (down to a multiple of `multiple`), scale every lr (and the scheduler's
        base lrs) by the same factor, say so; `where` names the rank that ran out (several ranks).

        Raises torch.cuda.OutOfMemoryError when the new size would be under `min_batch_size`."""
        assert self.batch_size is not None
        new = self.batch_size // 2 // self.multiple * self.multiple
        if new < self.min_batch_size:
            raise torch.cuda.OutOfMemoryError(
                f"out of memory at batch size {self.batch_size} in {self.stage}; cannot go below "
                f"{self.min_batch_size}: use a smaller model or image size"
            )
        old, self.batch_size = self.batch_size, new
        factor = new / old
        self.lr_scale *= factor
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if self.on_change is not None:
            self.on_change(new)
        every = "" if where is None else " on every rank"
        self.reporter.event(
            "warning",
            f"out of GPU memory{'' if where is None else ' on ' + where} at batch size {old} in "
            f"{self.stage}: retrying with batch size {new}{every} and learning rate x{factor:g} "
            "(linear scaling)",
            stage=self.stage,
            batch_size=new,
            previous_batch_size=old,
            lr_scale=self.lr_scale,
        )

    def run(
        self,
        batch: T,
        step: Callable[[T], R],
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
    ) -> list[R]:
        """Run `step` on the batch in chunks of the current size; on OOM halve and redo the chunk.

        Chunks already stepped stay stepped: only the failed chunk (and the rest) is retried.
        """
        if self.batch_size is None:
            n = _leading(batch) or 1
            self.batch_size = max(1, int(round(n * self.lr_scale)))
        results: list[R] = []
        pending = self._split(batch)
        while pending:
            chunk = pending.pop(0)
            if (_leading(chunk) or 0) > self.batch_size:  # cut before the size shrank
                pending = self._split(chunk) + pending
                continue
            failed: str | None = None
            try:
                results.append(step(chunk))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                failed = _who_ran_out(exc)
            # Free outside the except block: the traceback holds the failed step's activations.
            if failed is not None:
                optimizer.zero_grad(set_to_none=True)
                _free_memory()
                self.halve(optimizer, scheduler, failed or None)
                pending = self._split(chunk) + pending
        return results

    def _split(self, batch: T) -> list[T]:
        """Chunks of the current size, without a last chunk under `min_batch_size` images.

        5 images at size 2 would leave a chunk of 1: SP over one image is 0 (a 1x1 similarity
        matrix) and BatchNorm in training mode fails on it. That image is left out of this step.
        """
        assert self.batch_size is not None
        chunks = split_batch(batch, self.batch_size)
        if len(chunks) > 1 and (_leading(chunks[-1]) or 0) < self.min_batch_size:
            chunks.pop()
        return chunks


def _who_ran_out(exc: BaseException) -> str:
    """The rank that ran out ("" on one device); this rank's own OOM is told to the others first,
    at their check point, so every rank halves at this same step."""
    group = distributed.active()
    if group is None:
        return ""
    if isinstance(exc, distributed.PeerOutOfMemory):
        return f"rank {exc.rank}"
    distributed.tell_peers()
    return f"rank {group.rank}"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
