"""The device augmentation of the in-memory data path (models/data/inmemory.py): timm's training
crop (RandomResizedCrop + horizontal flip) and colour jitter, their parameters drawn for a whole
batch on a CPU generator, applied to the uint8 batch in one `grid_sample` on its device. The
per-model normalisation is models/data/loader.py `normalize_batch`, the one every data path uses.

Crop boxes are fractions of the ORIGINAL image geometry (torchvision's distribution: scale, aspect
ratio, 10 tries then a centre fallback). A view is fully described by (box, flip, jitter) and
applying it is deterministic, so the teacher cache (models/training/teacher_cache.py) can store
those parameters and reproduce exactly the view whose teacher features it computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_crop_params(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop + flip parameters for a batch, vectorised, on the CPU generator.

    sizes: (B, 2) original (h, w). Returns boxes (B, 4) = (x0, y0, x1, y1) as fractions of the
    original width/height, and flips (B,) bool. Same distribution as torchvision: integer boxes,
    log-uniform aspect ratio, first of `attempts` tries that fits, else a ratio-clamped centre crop.
    """
    b = sizes.shape[0]
    h = sizes[:, 0:1].double()
    w = sizes[:, 1:2].double()
    area = h * w
    target = area * torch.empty((b, attempts), dtype=torch.float64).uniform_(*scale, generator=generator)
    log_r = torch.empty((b, attempts), dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    # Offsets for every try; uniform over the valid integer range like torch.randint.
    u_y = torch.rand((b, attempts), dtype=torch.float64, generator=generator)
    u_x = torch.rand((b, attempts), dtype=torch.float64, generator=generator)
    top = torch.floor(u_y * (h - ch + 1).clamp(min=1))
    left = torch.floor(u_x * (w - cw + 1).clamp(min=1))

    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # first valid try (0 if none)
    any_ok = ok.any(dim=1)
    cw_s, ch_s = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    top_s, left_s = top.gather(1, first)[:, 0], left.gather(1, first)[:, 0]

    # Fallback (torchvision): whole image, aspect clamped into `ratio`, centred.
    h1, w1 = h[:, 0], w[:, 0]
    in_ratio = w1 / h1
    fb_w = torch.where(in_ratio > ratio[1], torch.round(h1 * ratio[1]), w1)
    fb_h = torch.where(in_ratio < ratio[0], torch.round(w1 / ratio[0]), h1)
    fb_top = torch.floor((h1 - fb_h) / 2)
    fb_left = torch.floor((w1 - fb_w) / 2)
    cw_s = torch.where(any_ok, cw_s, fb_w)
    ch_s = torch.where(any_ok, ch_s, fb_h)
    top_s = torch.where(any_ok, top_s, fb_top)
    left_s = torch.where(any_ok, left_s, fb_left)

    boxes = torch.stack([left_s / w1, top_s / h1, (left_s + cw_s) / w1, (top_s + ch_s) / h1], dim=1)
    flips = torch.rand(b, generator=generator) < flip_p
    return boxes.float(), flips


def sample_jitter(b: int, generator: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """(B, 3) brightness, contrast, saturation factors, uniform in [1-s, 1+s] (timm's default 0.4)."""
    return 1.0 + strength * (2.0 * torch.rand((b, 3), generator=generator) - 1.0)


# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = torch.tensor((0.2989, 0.587, 0.114)).view(1, 3, 1, 1)


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Small CPU -> GPU copies without a stream sync (a blocking .to() waits for the GPU queue)."""
    return t.to(device=device, dtype=dtype, non_blocking=True)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's brightness -> contrast -> saturation blends on float 0..255 images, batched."""
    f = to_device(factors, x.device, x.dtype).view(-1, 3, 1, 1, 1).unbind(1)
    luma = to_device(_LUMA, x.device, x.dtype)
    x = (x * f[0]).clamp_(0, 255)
    gray_mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (f[1] * x + (1 - f[1]) * gray_mean).clamp_(0, 255)
    gray = (x * luma).sum(1, keepdim=True)
    return (f[2] * x + (1 - f[2]) * gray).clamp_(0, 255)


def center_params(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image, unflipped (used for a deterministic train-set pass)."""
    return torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1), torch.zeros(b, dtype=torch.bool)


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    out_size: int,
    jitter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each image to its box, resize to out_size, flip, colour-jitter; uint8 in and out.

    One affine grid_sample for the whole batch. align_corners=False maps the box edges (fractions
    of the image) to pixel edges, as a crop-then-resize does. Deterministic for given inputs, which
    is what lets the teacher cache reproduce a view bit for bit.
    """
    b = images.shape[0]
    device = images.device
    boxes = to_device(boxes, device, torch.float32)
    sign = 1.0 - 2.0 * to_device(flips, device, torch.float32)  # -1 mirrors x
    x0, y0, x1, y1 = boxes.unbind(1)
    theta = torch.zeros((b, 2, 3), device=device, dtype=torch.float32)
    theta[:, 0, 0] = (x1 - x0) * sign
    theta[:, 0, 2] = x0 + x1 - 1.0
    theta[:, 1, 1] = y1 - y0
    theta[:, 1, 2] = y0 + y1 - 1.0
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter is not None:
        out = color_jitter(out, jitter)
    return out.round_().clamp_(0, 255).to(torch.uint8)
