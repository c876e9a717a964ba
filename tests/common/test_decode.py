"""One decoder (common/decode.py): every path that turns a file into pixels gives the same pixels for
the same odd file: the upload check, the DataLoader path, the in-memory path (its train store feeds
the teacher cache), evaluation and the README's load snippet."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spkd.common import decode, scan
from spkd.models.data import inmemory, loader
from spkd.models.networks.factory import DataConfig
from tests.helpers import ROOT

W, H = 40, 30  # not square: an EXIF rotation shows in the shape


def ramp(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * (x / (W - 1)) for _ in range(H) for x in range(W)]


def odd_files(folder: Path) -> dict[str, Path]:
    """The files the issue names: 16-bit, float TIFF, palette with transparency, CMYK, alpha,
    EXIF orientation, 1-bit."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        out[name] = folder / name
        im.save(out[name], **kw)

    g16 = Image.new("I;16", (W, H))
    g16.putdata([round(v) for v in ramp(0, 65535)])
    save("gray16.png", g16)
    save("gray16.tif", g16)
    f01 = Image.new("F", (W, H))
    f01.putdata(ramp(0.0, 1.0))
    save("float01.tif", f01)
    fwide = Image.new("F", (W, H))
    fwide.putdata(ramp(-1.0, 3.0))
    save("float_wide.tif", fwide)
    pal = Image.new("P", (W, H), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, W // 2, H))
    save("palette_trns.png", pal, transparency=0)
    save("cmyk.jpg", Image.new("CMYK", (W, H), (0, 255, 255, 0)), quality=95)
    rgba = Image.new("RGBA", (W, H), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, W // 2, H))
    save("rgba.png", rgba)
    save("la.png", Image.new("LA", (W, H), (0, 128)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    photo = Image.new("RGB", (W, H), "green")
    photo.paste((255, 255, 0), (0, 0, 10, 10))
    save("exif6.jpg", photo, exif=exif.tobytes(), quality=95)
    save("bw.bmp", Image.new("1", (W, H), 1))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return odd_files(tmp_path_factory.mktemp("odd"))


def test_the_policy(files):
    px = {name: np.asarray(decode.load_rgb(p)) for name, p in files.items()}
    for name in ("gray16.png", "gray16.tif", "float01.tif", "float_wide.tif"):
        row = px[name][0, :, 0]  # a ramp: black to white, not saturated either way
        assert row[0] == 0 and row[-1] == 255 and 110 < row.mean() < 145, (name, row)
        assert (np.diff(row.astype(int)) >= 0).all(), name
    assert (px["rgba.png"][:, : W // 2] == 255).all()  # transparent: white
    assert (px["rgba.png"][:, W // 2 :] == [255, 0, 0]).all()
    assert (px["palette_trns.png"][:, : W // 2] == 255).all()
    assert (abs(px["la.png"].astype(int) - 127) <= 1).all()  # black at alpha 128/255 over white
    assert px["exif6.jpg"].shape == (W, H, 3)  # turned upright
    assert px["exif6.jpg"][2, -3].tolist() == pytest.approx([255, 255, 0], abs=40)  # corner moved right
    assert px["cmyk.jpg"][0, 0].tolist() == pytest.approx([255, 0, 0], abs=8)
    assert (px["bw.bmp"] == 255).all()
    assert all(a.dtype == np.uint8 and a.shape[2] == 3 for a in px.values())


def _readme_loader():
    """The README snippet's own decoding lines, run as they are."""
    text = (ROOT / "README.md").read_text().split("<!-- load-student -->", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    lines = [ln for ln in snippet.splitlines() if "load_rgb" in ln]
    assert any(ln.startswith("from spkd.common.decode import load_rgb") for ln in lines), lines
    assert any('= load_rgb("photo.jpg")' in ln for ln in lines), lines
    code = "\n".join(ln.replace('"photo.jpg"', "path") for ln in lines)

    def run(path: Path) -> Image.Image:
        scope = {"path": str(path)}
        exec(code, scope)  # noqa: S102 - the README's own lines
        return scope["image"]

    return run


def test_every_path_gives_the_same_pixels(files):
    paths = [str(p) for p in files.values()]
    # Upload validation (and the engine's scan): every odd file is accepted.
    assert [scan.check_image(p) for p in paths] == [None] * len(paths)
    reference = {p: decode.load_rgb(p) for p in paths}

    # Evaluation / the DataLoader path vs the in-memory eval path: the same transform on the same
    # pixels, so identical tensors.
    cfg = DataConfig((3, 32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.9, "center")
    transform = loader.make_transform(32, cfg, training=False)
    samples = [loader.Sample(p, 0) for p in paths]
    from_loader = torch.stack([loader.ImageDataset(samples, transform)[i][0] for i in range(len(paths))])
    in_memory = inmemory.decode_eval_images(paths, transform, workers=1)
    assert from_loader.dtype == in_memory.dtype == torch.uint8
    assert torch.equal(from_loader, in_memory)
    expected = torch.stack([transform(reference[p]) for p in paths])
    assert torch.equal(from_loader, expected)

    # The in-memory train store (what the teacher cache computes its features on).
    store, sizes = inmemory.decode_train_images(paths, 24, workers=1)
    for i, p in enumerate(paths):
        want = np.array(reference[p].resize((24, 24), Image.Resampling.BILINEAR))
        assert torch.equal(store[i], torch.from_numpy(want).permute(2, 0, 1)), p
        assert tuple(sizes[i].tolist()) == (reference[p].height, reference[p].width), p

    # The README's load snippet.
    readme = _readme_loader()
    for p in paths:
        assert np.array_equal(np.asarray(readme(Path(p))), np.asarray(reference[p])), p


def test_sixteen_bit_classes_stay_apart_in_memory(tmp_path):
    """The issue's case: two classes of 16-bit grey PNGs (dark vs bright) turned both white in the
    in-memory path. They must stay as different as the DataLoader path sees them."""
    for name, level in (("dark", 12_000), ("bright", 52_000)):
        for i in range(2):
            im = Image.new("I;16", (16, 16))
            im.putdata([level + 50 * i] * 256)
            (tmp_path / name).mkdir(exist_ok=True)
            im.save(tmp_path / name / f"{i}.png")
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    store, _ = inmemory.decode_train_images(paths, 16, workers=1)
    means = {Path(p).parent.name: float(store[i].float().mean()) for i, p in enumerate(paths)}
    assert means["dark"] == pytest.approx(12_000 * 255 / 65535, abs=1)
    assert means["bright"] == pytest.approx(52_000 * 255 / 65535, abs=1)


def test_in_memory_bytes_roundtrip():
    """A JPEG opened from bytes decodes like the file (to_rgb is the shared step)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "JPEG")
    buf.seek(0)
    with Image.open(buf) as im:
        assert decode.to_rgb(im).mode == "RGB"
