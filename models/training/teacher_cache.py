"""Teacher-feature cache: run the frozen teacher once per augmented view.

During distillation the teacher is frozen, so the outputs the distillation methods read (features
at their taps, logits for KD) depend only on the input view. We draw V random-resized-crop + flip
views per training image, run the
teacher on each once, and keep the features in half precision (GPU memory when they fit, else
pinned host memory). Every distillation epoch each image uses one of its V views (without
replacement inside a cycle of V epochs, so V >= epochs means no view repeats); the student input is
rebuilt from the decoded uint8 image and the stored (box, flip), with the same deterministic
device crop that produced the teacher's input, so the student sees EXACTLY the view its teacher
features were computed on. The step then costs about one student step.

Only used with the in-memory data path (models/data/inmemory.py): if the decoded images do not fit
in memory, the features (usually larger than the images) do not either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from spkd.models.data.augment import center_params, to_device
from spkd.models.data.inmemory import (
    GPU_DATA_FRACTION,
    TrainSource,
    Views,
    epoch_generator,
    gpu_free_bytes,
    host_available_bytes,
)
from spkd.models.data.loader import Batch

# uint8 (B, 3, S, S) on the device -> (logits or None, features per method tap pair); the engine's
# live teacher with its own normalisation in front.
TeacherFn = Callable[[torch.Tensor], tuple[torch.Tensor | None, list[torch.Tensor]]]

HOST_CACHE_FRACTION = 0.4
DEFAULT_VIEWS = 8


@dataclass(frozen=True)
class CacheDecision:
    use: bool
    placement: Literal["gpu", "host"] | None
    bytes_needed: int
    reason: str


def cache_bytes(n_images: int, views: int, per_sample_numel: int, bytes_per_value: int = 2) -> int:
    """Features + logits for every (view, image), plus the view parameters (5 floats)."""
    return n_images * views * (per_sample_numel * bytes_per_value + 5 * 4)


def probe_teacher(teacher_fn: TeacherFn, source: TrainSource) -> tuple[list[torch.Size], int | None]:
    """Per-sample feature shapes and logit width, from one forward on two images."""
    idx = torch.arange(min(2, len(source.store)))
    with torch.no_grad():
        logits, feats = teacher_fn(source.view(idx, Views(*center_params(idx.numel()), None)))
    return [f.shape[1:] for f in feats], (None if logits is None else logits.shape[1])


def decide(
    mode: Literal["auto", "on", "off"],
    bytes_needed: int,
    device: torch.device,
    gpu_budget: int | None = None,
    host_budget: int | None = None,
) -> CacheDecision:
    """'off' never; 'auto' when it fits the GPU or host budget; 'on' also when it fits at all."""
    gib = 1024**3
    if mode == "off":
        return CacheDecision(False, None, bytes_needed, "teacher cache off in the job spec")
    if gpu_budget is None:
        gpu_budget = int(gpu_free_bytes(device) * GPU_DATA_FRACTION)
    if host_budget is None:
        host_budget = int(host_available_bytes() * HOST_CACHE_FRACTION)
    need = f"{bytes_needed / gib:.2f} GiB"
    if device.type == "cuda" and bytes_needed <= gpu_budget:
        return CacheDecision(True, "gpu", bytes_needed, f"teacher cache in GPU memory ({need})")
    if bytes_needed <= host_budget:
        return CacheDecision(True, "host", bytes_needed, f"teacher cache in host memory ({need})")
    if mode == "on" and bytes_needed <= host_available_bytes() * 0.8:
        return CacheDecision(True, "host", bytes_needed, f"teacher cache forced on in host memory ({need})")
    return CacheDecision(
        False, None, bytes_needed, f"teacher cache needs {need}, more than the memory budget: live teacher"
    )


class TeacherCache:
    """V stored views per image: their parameters and the teacher's outputs on them.

    As the engine's teacher function, `cache(x_t, indices)` returns the stored (logits, features)
    of the views handed out by the current `epoch()` iterator, ignoring x_t (already matched).
    """

    def __init__(
        self,
        source: TrainSource,
        views: Views,
        features: list[torch.Tensor],
        logits: torch.Tensor | None,
        seed: int,
    ):
        self.source = source
        self.params = views  # boxes (V, N, 4), flips (V, N), jitter (V, N, 3) | None; CPU
        self.features = features  # per layer (V, N, *shape), half precision
        self.logits = logits  # (V, N, C) or None
        self.seed = seed
        self.views = views.boxes.shape[0]
        self._batch: tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        p = self.params
        tensors = [*self.features, p.boxes, p.flips]
        tensors += [t for t in (p.jitter, self.logits) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def build(
        cls,
        source: TrainSource,
        teacher_fn: TeacherFn,
        views: int = DEFAULT_VIEWS,
        batch_size: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        placement: Literal["gpu", "host"] = "host",
        progress: Callable[[int, int], None] | None = None,
        keep_logits: bool = True,
        keep_features: bool = True,
    ) -> TeacherCache:
        """Run the teacher on V random views of every image; `progress(done, total)` per batch.

        keep_logits / keep_features: store only what the methods read (models.methods.needs).
        """
        n = len(source.store)
        bs = batch_size or source.batch_size
        where = source.store.device if placement == "gpu" else torch.device("cpu")
        pin = placement == "host" and source.store.device.type == "cuda"
        per_view = [
            source.sample_views(torch.arange(n), epoch_generator(seed, v, salt=3)) for v in range(views)
        ]
        params = Views(
            torch.stack([p.boxes for p in per_view]),
            torch.stack([p.flips for p in per_view]),
            None if per_view[0].jitter is None else torch.stack([p.jitter for p in per_view]),
        )
        features: list[torch.Tensor] | None = None
        logits: torch.Tensor | None = None
        total, done = views * math.ceil(n / bs), 0
        for v in range(views):
            for start in range(0, n, bs):
                idx = torch.arange(start, min(n, start + bs))
                with torch.no_grad():
                    out, feats = teacher_fn(source.view(idx, _select(params, torch.full_like(idx, v), idx)))
                feats = feats if keep_features else []
                out = out if keep_logits else None
                if features is None:  # allocate once the shapes are known
                    features = [_alloc((views, n, *f.shape[1:]), dtype, where, pin) for f in feats]
                    if out is not None:
                        logits = _alloc((views, n, out.shape[1]), dtype, where, pin)
                for store, f in zip(features, feats, strict=True):
                    store[v, start : start + idx.numel()] = f.detach().to(dtype)
                if logits is not None and out is not None:
                    logits[v, start : start + idx.numel()] = out.detach().to(dtype)
                done += 1
                if progress is not None:
                    progress(done, total)
        return cls(source, params, features or [], logits, seed)

    def view_ids(self, epoch: int) -> torch.Tensor:
        """(N,) view per image for `epoch`: a fresh random order of the V views every V epochs."""
        n = len(self.source.store)
        cycle, pos = divmod(epoch, self.views)
        order = torch.rand((n, self.views), generator=epoch_generator(self.seed, cycle, salt=4)).argsort(1)
        return order[:, pos]

    def lookup(
        self, indices: torch.Tensor, view_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Stored (logits, features) for (view_ids[i], indices[i]), as float32 on the device."""
        device = self.source.store.device

        def take(t: torch.Tensor) -> torch.Tensor:
            v, i = to_device(view_ids, t.device), to_device(indices, t.device)
            return to_device(t[v, i], device).float()

        return (take(self.logits) if self.logits is not None else None), [take(f) for f in self.features]

    def reproduce(self, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """The exact uint8 view the teacher saw for (view_ids[i], indices[i])."""
        return self.source.view(indices, _select(self.params, view_ids, indices))

    def __call__(
        self, _x_t: torch.Tensor | None, indices: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The engine's teacher function: the stored outputs for the current batch's views.

        `indices` may be the whole batch `epoch()` just yielded or any part of it (the OOM
        handler splits batches); positions come from a device-side table, so no host sync.
        """
        if self._batch is None:
            raise RuntimeError("TeacherCache used as a teacher outside of TeacherCache.epoch()")
        logits, feats, where = self._batch
        pos = where[to_device(indices, where.device)]
        return (None if logits is None else logits[pos]), [f[pos] for f in feats]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Distillation batches: exactly the cached views, in the uncached epoch's image order.

        Each batch's teacher outputs are gathered (and sent to the device) as the batch is made,
        for `__call__` to serve. Honours a batch size the OOM handler changed (source.batch_size).
        """
        source = self.source
        device = source.store.device
        vids = self.view_ids(epoch)
        where = torch.zeros(len(source.store), dtype=torch.long, device=device)
        try:
            for idx in source.batches(epoch):
                v = vids[idx]
                logits, feats = self.lookup(idx, v)
                where[to_device(idx, device)] = torch.arange(idx.numel(), device=device)
                self._batch = (logits, feats, where)
                views = _select(self.params, v, idx)
                labels = to_device(source.store.labels_cpu[idx], device)
                yield Batch(source.view(idx, views), labels, idx, views.boxes, views.flips, views.jitter)
        finally:
            self._batch = None


def _select(params: Views, view_ids: torch.Tensor, indices: torch.Tensor) -> Views:
    jitter = None if params.jitter is None else params.jitter[view_ids, indices]
    return Views(params.boxes[view_ids, indices], params.flips[view_ids, indices], jitter)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.pin_memory() if pin else t
