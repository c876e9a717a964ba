"""The one decoder: every path that turns an image file into pixels calls `load_rgb`.

Upload validation and the engine's scan (common/scan.py), the DataLoader path (models/data/loader.py),
the in-memory path and hence the teacher cache (models/data/inmemory.py), evaluation and the README's
load snippet all decode through here, so one file gives the same 8-bit RGB pixels everywhere.

Policy (also in docs/datasets.md):

- file type by content (Pillow), never by extension; multi-frame files (GIF, TIFF): the first frame;
- EXIF orientation applied (a phone photo stored sideways is turned upright);
- 16-bit integer images (`I;16*`, and `I` whose values exceed 255) scaled by 255/65535, rounded:
  0 -> 0 and 65535 -> 255 (Pillow's own `convert` clips at 255, turning them white);
- 32-bit float images (`F`, float TIFF): values in [0, 1] scaled by 255; any other range
  stretched linearly from the image's min..max to 0..255 (a constant image becomes its value,
  clipped to 0..255);
- alpha (RGBA, LA, PA, palette or grey with a transparent colour) composited on white, then
  dropped: a transparent logo on white, not on black;
- palette, 1-bit, grey, CMYK, YCbCr, LAB and HSV converted to RGB by Pillow.

Torch-free and numpy-free: the API image imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
WHITE = (255, 255, 255, 255)


def load_rgb(path: str | Path | BinaryIO, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` (a file name, or an open binary file such as an upload) to a loaded 8-bit RGB
    image following the module's policy.

    `draft` (width, height) lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) that stays at
    least that large, for speed; other formats ignore it. The file is closed on return.
    Raises Pillow's errors: `UnidentifiedImageError` (not an image), `OSError`/`ValueError`/
    `SyntaxError`/`EOFError` (corrupt or truncated data), `Image.DecompressionBombError`.
    """
    return open_rgb(path, draft)[0]


def open_rgb(
    path: str | Path | BinaryIO, draft: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """`load_rgb` plus the image's full-resolution (height, width), upright (EXIF applied), as
    before any JPEG draft reduction: the in-memory path samples crops in those coordinates."""
    with Image.open(path) as img:
        width, height = img.size
        if draft is not None:
            img.draft("RGB", draft)
        img.load()
        rgb = to_rgb(img)
    if (rgb.width > rgb.height) != (width > height) and width != height:
        width, height = height, width  # EXIF turned it by 90 degrees
    return rgb, (height, width)


def to_rgb(img: Image.Image) -> Image.Image:
    """An already opened image (any mode) -> 8-bit RGB, by the module's policy (EXIF included)."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _deep_to_l(img.convert("I") if img.mode != "I" else img)
    elif img.mode == "F":
        img = _float_to_l(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _deep_to_l(img: Image.Image) -> Image.Image:
    """A 32-bit integer image holding 16-bit samples -> 8-bit grey (v * 255 / 65535, rounded)."""
    low, high = img.getextrema()
    if isinstance(high, int) and high <= 255 and low >= 0:
        return img.convert("L")  # an `I` image with 8-bit values (some TIFF writers): as they are
    return img.point(lambda v: v * (255 / 65535) + 0.5).convert("L")


def _float_to_l(img: Image.Image) -> Image.Image:
    """A float image -> 8-bit grey: [0, 1] scaled by 255, any other range stretched min..max."""
    low, high = img.getextrema()
    if low >= 0.0 and high <= 1.0:
        return img.point(lambda v: v * 255 + 0.5).convert("L")
    if high > low:
        scale = 255 / (high - low)
        return img.point(lambda v: (v - low) * scale + 0.5).convert("L")
    return img.convert("L")  # constant: its value, clipped to 0..255 by convert
