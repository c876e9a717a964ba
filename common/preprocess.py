"""The engine's evaluation transform without torch: resize, centre crop and normalise with Pillow
and NumPy, for inference outside the engine (the API's predict route, app/predict.py).

The engine evaluates an image as timm's eval transform (models/data/loader.py `make_transform`,
`training=False`: a resize by `crop_mode`, a centre crop, uint8 pixels) followed by the device-side
normalisation `(x / 255 - mean) / std` (models/training/engine.py `Normalizer`). `eval_array` computes
the same float32 array from the same decoded pixels (common/decode.py `load_rgb`), step by step as
timm 1.0 and torchvision do it on a PIL image:

- `center` (timm's default): the shorter side resized to floor(S / crop_pct), the longer one to
  int(that x long / short), then an S x S centre crop (padded with black where the image is smaller);
- `squash`: both sides resized to floor(S / crop_pct), then the centre crop;
- `border`: the longer side resized to floor(S / crop_pct) keeping the aspect ratio (each side
  rounded), then centre-cropped or padded to S x S with the ImageNet mean colour (124, 116, 104),
  the fill timm uses when no mean is passed to it, as the engine does not.

Pillow's resampling is what torchvision calls for a PIL image (antialiased). tests/common/
test_preprocess.py compares the result with the engine's transform on real photos. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

DEFAULT_CROP_PCT = 0.875  # timm's, when a config has none
BORDER_FILL = (124, 116, 104)  # round(255 x IMAGENET_DEFAULT_MEAN): timm's border fill by default
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class EvalConfig:
    """What evaluation does to an image: square size S, normalisation, resampling and crop."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(RESAMPLE)}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not one of {list(CROP_MODES)}")
        if self.image_size < 1 or not self.crop_pct > 0:
            raise ValueError("image_size must be >= 1 and crop_pct > 0")

    @classmethod
    def from_hub_config(cls, config: dict[str, Any]) -> EvalConfig:
        """From the `config.json` of a timm hub folder the export stage wrote (models/results/
        export.py save_hub_folder): its `pretrained_cfg` holds the data config training used.
        Raises ValueError (KeyError, TypeError included) for a config without one."""
        try:
            cfg = config["pretrained_cfg"]
            size = cfg["input_size"]
            return cls(
                image_size=int(size[-1]),
                mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
                interpolation=str(cfg.get("interpolation") or "bicubic"),
                crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
                crop_mode=str(cfg.get("crop_mode") or "center"),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"not a timm hub config with a pretrained_cfg: {exc}") from exc


def _resize(img: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's resize of a PIL image: nothing to do at the same size."""
    if (img.height, img.width) == (height, width):
        return img
    return img.resize((width, height), resample)


def _crop_or_pad(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """torchvision's / timm's centre crop: pad (left/top get the smaller half) where the image is
    smaller than the crop, then crop at round((H - S) / 2), round((W - S) / 2)."""
    if size > img.width or size > img.height:
        dw, dh = max(0, size - img.width), max(0, size - img.height)
        img = ImageOps.expand(img, border=(dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2), fill=fill)
        if img.size == (size, size):
            return img
    top = int(round((img.height - size) / 2.0))
    left = int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_pixels(img: Image.Image, cfg: EvalConfig) -> np.ndarray:
    """The uint8 pixels (3 x S x S) the engine's eval transform makes of an RGB image."""
    s = cfg.image_size
    scale = math.floor(s / cfg.crop_pct)
    resample = RESAMPLE[cfg.interpolation]
    if cfg.crop_mode == "squash":
        img = _crop_or_pad(_resize(img, scale, scale, resample), s, (0, 0, 0))
    elif cfg.crop_mode == "border":
        ratio = max(img.height / scale, img.width / scale)
        img = _resize(img, round(img.height / ratio), round(img.width / ratio), resample)
        img = _crop_or_pad(img, s, BORDER_FILL)
    else:
        short, long = min(img.size), max(img.size)
        new_short, new_long = scale, int(scale * long / short)
        height, width = (new_long, new_short) if img.height > img.width else (new_short, new_long)
        img = _crop_or_pad(_resize(img, height, width, resample), s, (0, 0, 0))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def normalize_pixels(pixels: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """uint8 (..., 3, H, W) numpy pixels -> float32 `(x / 255 - mean) / std` on the CPU, as the
    engine's `models.data.loader.normalize_batch` does to a torch batch on the device."""
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels.astype(np.float32) / np.float32(255.0) - mean) / std


def eval_batch(images: Sequence[Image.Image], cfg: EvalConfig) -> np.ndarray:
    """N RGB images -> the model's float32 input N x 3 x S x S, as evaluation prepares it."""
    return normalize_pixels(np.stack([eval_pixels(img, cfg) for img in images]), cfg)
