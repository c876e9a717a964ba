"""A data path that keeps the GPU busy: decode once, augment on the device.

A PIL loader decodes and resizes every JPEG every epoch (about 210 images/s per core, measured on an
H200 host; bench/README.md), so on a GPU host the loader, not the GPU, sets the speed. Here each
image is decoded once, in parallel threads (PIL releases the GIL while decoding and resizing), into
a fixed-size uint8 array kept in host memory (pinned) or on the GPU when it fits. Every epoch the
random resized crop + horizontal flip of a whole batch is one `grid_sample` call on the device; the
batch stays uint8 (B, 3, S, S) so each model normalises it with its own mean/std on the device.

Why a square store: one (N, 3, L, L) array lets one batched call crop any subset of images. Each
image is resized to L x L (aspect squashed) and its original size is kept; crop boxes are drawn
in ORIGINAL pixel geometry (torchvision's RandomResizedCrop distribution: scale, aspect ratio,
10 tries then a centre fallback), so the crop has the right shape and content, only resampled
from the squashed store. With L ~ 1.14 x S (256 for 224) downscaling is at most 1.14x and
bilinear sampling is close to an antialiased resize.

Evaluation is deterministic and matches timm's eval transform exactly: timm's own
Resize + CenterCrop run once at decode time and the uint8 result is kept.

A crop is fully described by (box, flip), and applying it is deterministic, so the teacher cache
(models/training/teacher_cache.py) can store those parameters and reproduce exactly the view whose teacher
features it computed. The crop, flip and colour jitter themselves are models/data/augment.py's.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from spkd.common import decode
from spkd.models.data.augment import crop_resize, sample_crop_params, sample_jitter, to_device
from spkd.models.data.loader import Batch

Placement = Literal["gpu", "host", "loader"]

# Share of free memory the decoded images may take: the rest is for models, activations,
# the teacher cache and the OS page cache.
GPU_DATA_FRACTION = 0.25
HOST_DATA_FRACTION = 0.4


def store_size_for(image_size: int) -> int:
    """Side of the square uint8 store: timm's 0.875 crop ratio (256 for 224)."""
    return int(math.ceil(image_size / 0.875))


# ---------------------------------------------------------------------------- memory planning


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); falls back to total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


@dataclass(frozen=True)
class MemoryPlan:
    placement: Placement
    bytes_needed: int
    gpu_budget: int
    host_budget: int

    def describe(self) -> str:
        gib = 1024**3
        return (
            f"decoded images need {self.bytes_needed / gib:.2f} GiB; budget GPU "
            f"{self.gpu_budget / gib:.2f} GiB, host {self.host_budget / gib:.2f} GiB -> {self.placement}"
        )


def image_store_bytes(n_images: int, store_size: int) -> int:
    return n_images * 3 * store_size * store_size


def plan_memory(
    bytes_needed: int,
    device: torch.device,
    gpu_budget: int | None = None,
    host_budget: int | None = None,
) -> MemoryPlan:
    """GPU if it fits the GPU budget, else pinned host memory, else 'loader' (stream from disk)."""
    if gpu_budget is None:
        gpu_budget = int(gpu_free_bytes(device) * GPU_DATA_FRACTION)
    if host_budget is None:
        host_budget = int(host_available_bytes() * HOST_DATA_FRACTION)
    if device.type == "cuda" and bytes_needed <= gpu_budget:
        placement: Placement = "gpu"
    elif bytes_needed <= host_budget:
        placement = "host"
    else:
        placement = "loader"
    return MemoryPlan(placement, bytes_needed, gpu_budget, host_budget)


# ---------------------------------------------------------------------------- decoding


def default_decode_workers() -> int:
    return max(1, min(32, (os.cpu_count() or 1)))


def _decode_square(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode (common.decode, at reduced JPEG scale when possible), squash to size x size, keep
    the full-resolution upright (h, w)."""
    # draft lets libjpeg decode at 1/2, 1/4, 1/8 scale while staying >= the requested size.
    img, (height, width) = decode.open_rgb(path, draft=(size, size))
    rgb = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8), (height, width)  # a writable copy


def decode_train_images(
    paths: Sequence[str | Path], store_size: int, workers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, L, L) uint8 squashed images and (N, 2) original (height, width), decoded in threads."""
    images = torch.empty((len(paths), 3, store_size, store_size), dtype=torch.uint8)
    sizes = torch.empty((len(paths), 2), dtype=torch.int64)

    def work(i: int) -> None:
        array, (h, w) = _decode_square(paths[i], store_size)
        images[i].copy_(torch.from_numpy(array).permute(2, 0, 1))
        sizes[i, 0], sizes[i, 1] = h, w

    _run_parallel(work, len(paths), workers)
    return images, sizes


def decode_eval_images(
    paths: Sequence[str | Path],
    transform: Callable[[Image.Image], torch.Tensor],
    workers: int | None = None,
) -> torch.Tensor:
    """Apply a uint8-producing eval transform (models/data/loader.py `make_transform`) once per
    image, in threads."""
    first: list[torch.Tensor | None] = [None] * len(paths)

    def work(i: int) -> None:
        first[i] = transform(decode.load_rgb(paths[i]))

    _run_parallel(work, len(paths), workers)
    return torch.stack(first)  # type: ignore[arg-type]


def _run_parallel(work: Callable[[int], None], n: int, workers: int | None) -> None:
    workers = workers or default_decode_workers()
    if workers <= 1 or n <= 1:
        for i in range(n):
            work(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # list() re-raises the first decode error instead of losing it.
        list(pool.map(work, range(n)))


# ---------------------------------------------------------------------------- batch sources


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator per (seed, epoch): resuming at epoch e replays exactly the same batches."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63 - 1))
    return g


class ImageStore:
    """Decoded uint8 images + labels, on the GPU or in (pinned) host memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, on_gpu: bool):
        self.device = device
        self.on_gpu = on_gpu and device.type == "cuda"
        if self.on_gpu:
            self.images = images.to(device)
        else:
            self.images = images
            if device.type == "cuda":
                # Pinned: the per-batch copy to the GPU runs asynchronously. Pinning tens of GiB
                # can fail; pageable memory still works.
                with contextlib.suppress(RuntimeError):
                    self.images = images.pin_memory()
        self.labels_cpu = labels.to(torch.int64)
        self.labels = self.labels_cpu.to(device)
        self._staging: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored uint8 images at `indices`, on the training device."""
        if self.on_gpu:
            return self.images.index_select(0, to_device(indices, self.device))
        if self.device.type != "cuda":
            return self.images.index_select(0, indices)
        # Gather into one of two reused pinned buffers so the copy to the GPU is asynchronous and
        # the CPU gathers batch k+1 while the GPU still works on batch k.
        shape = (indices.numel(), *self.images.shape[1:])
        slot = self._slot = 1 - self._slot
        if self._staging[slot] is None or self._staging[slot].shape[0] < shape[0]:
            self._staging[slot] = torch.empty(shape, dtype=torch.uint8).pin_memory()
        elif self._copied[slot] is not None:
            self._copied[slot].synchronize()  # its previous copy must be done before we overwrite
        buf = self._staging[slot][: shape[0]]
        torch.index_select(self.images, 0, indices, out=buf)
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[slot] = event
        return out


@dataclass(frozen=True)
class Augment:
    """timm's training augmentation, as parameters of the device crop."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    color_jitter: float = 0.4  # 0 turns it off


@dataclass
class Views:
    """Everything that defines an augmented view of a batch of images (all CPU)."""

    boxes: torch.Tensor  # (B, 4)
    flips: torch.Tensor  # (B,) bool
    jitter: torch.Tensor | None  # (B, 3) or None


class TrainSource:
    """Random-resized-crop + flip + colour-jitter batches from the decoded store, on the device.

    `batch_size` may be changed between batches (the OOM handler halves it); the epoch's
    permutation continues with the new size.
    """

    def __init__(
        self,
        store: ImageStore,
        sizes: torch.Tensor,
        image_size: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        augment: Augment | None = None,
        min_batch: int = 2,
    ):
        self.store = store
        self.sizes = sizes
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.augment = augment or Augment()
        self.min_batch = min_batch  # SP and BatchNorm need at least 2 images

    def __len__(self) -> int:
        n = len(self.store)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def sample_views(self, indices: torch.Tensor, generator: torch.Generator) -> Views:
        a = self.augment
        boxes, flips = sample_crop_params(self.sizes[indices], generator, a.scale, a.ratio, a.flip_p)
        jitter = sample_jitter(indices.numel(), generator, a.color_jitter) if a.color_jitter > 0 else None
        return Views(boxes, flips, jitter)

    def view(self, indices: torch.Tensor, views: Views) -> torch.Tensor:
        """The exact uint8 view of the images at `indices`."""
        return crop_resize(
            self.store.gather(indices), views.boxes, views.flips, self.image_size, views.jitter
        )

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.store), generator=epoch_generator(self.seed, epoch, salt=1))

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """Index batches of the epoch's permutation, at the batch size current when each is cut."""
        perm = self.order(epoch)
        start = 0
        while start < perm.numel():
            idx = perm[start : start + self.batch_size]
            start += idx.numel()
            if idx.numel() < self.min_batch or (self.drop_last and idx.numel() < self.batch_size):
                return
            yield idx

    def epoch(self, epoch: int) -> Iterator[Batch]:
        gen = epoch_generator(self.seed, epoch, salt=2)
        for idx in self.batches(epoch):
            views = self.sample_views(idx, gen)
            labels = to_device(self.store.labels_cpu[idx], self.store.device)
            yield Batch(self.view(idx, views), labels, idx, views.boxes, views.flips, views.jitter)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


class EvalSource:
    """Fixed batches of timm-eval-transformed uint8 images (already cropped at decode time)."""

    def __init__(self, store: ImageStore, batch_size: int):
        self.store = store
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.store) / self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        n = len(self.store)
        for start in range(0, n, self.batch_size):
            idx = torch.arange(start, min(n, start + self.batch_size))
            labels = to_device(self.store.labels_cpu[idx], self.store.device)
            yield Batch(self.store.gather(idx), labels, idx)
