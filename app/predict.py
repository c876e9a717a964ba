"""Classifying uploaded images with a finished job's shipped student, inside the API process and
without torch (the route is app/routes/predict.py).

- The model is the job's `student.onnx` run by onnxruntime (one intra-op thread per request), with
  the labels and data config of its hub folder (`student/config.json`, timm's `pretrained_cfg`).
  Both are found as every artifact download finds them (app/downloads.py: the attempt folder the
  job record's `output` names, core/attempts.py; or the bucket, fetched once and verified).
- Images are decoded by common/decode.py (`load_rgb`, the engine's decoder) after a pixel-count
  check (SPKD_MAX_IMAGE_PIXELS), and preprocessed by common/preprocess.py (`eval_batch`, the engine's
  evaluation transform in NumPy): the same input evaluation gave the model.
- `ModelCache` keeps loaded sessions per (job, attempt folder, sha256 of the ONNX file), least
  recently used first out, bounded by SPKD_PREDICT_CACHE_BYTES counted as the ONNX files' sizes; a
  model larger than the bound is used for its request and not kept. One load per key at a time.
- `Slots` bounds the requests an API process works on at once (SPKD_PREDICT_CONCURRENCY); the CPU
  work runs in worker threads, off the event loop.

Every failure a client can cause is an `ApiError` with a stable code (413, 422), raised before
anything is loaded or cached.
"""

from __future__ import annotations

import json
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from spkd.app import downloads
from spkd.app.errors import ApiError, clip
from spkd.common.decode import load_rgb
from spkd.common.preprocess import EvalConfig, eval_batch
from spkd.core.settings import Settings

ONNX = "student.onnx"
CONFIG = "student/config.json"
THREADS = 1  # onnxruntime intra-op threads per request; requests run side by side (Slots)


@dataclass
class Model:
    """A loaded student: its onnxruntime session and what is needed around it."""

    session: Any
    input_name: str
    labels: list[str]
    cfg: EvalConfig
    nbytes: int  # the ONNX file's size: what the cache counts
    architecture: str


@dataclass
class ModelCache:
    """Loaded models, least recently used first out, bounded by `max_bytes` (the ONNX sizes)."""

    max_bytes: int
    _items: OrderedDict[tuple[str, ...], Model] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loading: dict[tuple[str, ...], threading.Lock] = field(default_factory=dict)
    loads: int = 0  # models loaded since start (cache misses that loaded)

    def get(self, key: tuple[str, ...], load: Callable[[], Model]) -> Model:
        """The cached model of `key`, else `load()`'s, kept when it fits. Concurrent callers of one
        key wait for a single load. Whatever `load` raises propagates; nothing is kept then."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            try:
                model = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self.loads += 1
                if model.nbytes <= self.max_bytes:
                    self._items[key] = model
                    while sum(m.nbytes for m in self._items.values()) > self.max_bytes:
                        self._items.popitem(last=False)
            return model

    def stats(self) -> dict[str, Any]:
        """{entries, bytes, loads, keys}: what the cache holds now."""
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": sum(m.nbytes for m in self._items.values()),
                "loads": self.loads,
                "keys": list(self._items),
            }


class Slots:
    """At most `limit` requests at once in one process (used from the event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.busy = limit, 0

    def take(self) -> bool:
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def give_back(self) -> None:
        self.busy = max(0, self.busy - 1)


@dataclass
class Predictor:
    """One per API process (app.state.predictor): the model cache and the request slots."""

    settings: Settings
    cache: ModelCache = field(init=False)
    slots: Slots = field(init=False)

    def __post_init__(self) -> None:
        self.cache = ModelCache(self.settings.predict_cache_bytes)
        self.slots = Slots(self.settings.predict_concurrency)


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class Upload:
    """One uploaded file as the route received it."""

    name: str
    file: IO[bytes]
    size: int


def decode_uploads(uploads: list[Upload], settings: Settings) -> list[Image.Image]:
    """Every upload decoded to RGB by common.decode, or ApiError naming the first bad file:
    422 `empty_image` (0 bytes), 413 `image_too_large` (over SPKD_PREDICT_MAX_IMAGE_BYTES),
    413 `too_many_pixels` (width x height over SPKD_MAX_IMAGE_PIXELS: the decompression-bomb
    guard, checked from the header before decoding), 422 `not_an_image` (not an image Pillow
    decodes, or a corrupt one). Blocking: run it in a worker thread."""
    images = []
    for i, up in enumerate(uploads):
        where = f"images[{i}]"
        name = clip(up.name or f"image {i + 1}")
        if up.size == 0:
            raise ApiError(422, "empty_image", f"{name!r} is empty (0 bytes)", where)
        if up.size > settings.predict_max_image_bytes:
            raise ApiError(
                413,
                "image_too_large",
                f"{name!r} is {up.size} bytes, over the {settings.predict_max_image_bytes} byte limit "
                "(SPKD_PREDICT_MAX_IMAGE_BYTES)",
                where,
            )
        images.append(_decode(up, name, where, settings.max_image_pixels))
    return images


def _decode(up: Upload, name: str, where: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            up.file.seek(0)
            with Image.open(up.file) as probe:
                width, height = probe.size
            if width * height > max_pixels:
                raise ApiError(
                    413,
                    "too_many_pixels",
                    f"{name!r} is {width}x{height} pixels, over the {max_pixels} pixel limit "
                    "(SPKD_MAX_IMAGE_PIXELS, the decompression-bomb guard)",
                    where,
                )
            up.file.seek(0)
            return load_rgb(up.file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(
            413, "too_many_pixels", f"{name!r} is too large (decompression-bomb guard: {exc})", where
        ) from None
    except UnidentifiedImageError:
        raise ApiError(422, "not_an_image", f"{name!r} is not an image Pillow can read", where) from None
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure: a corrupt or truncated file
        raise ApiError(
            422,
            "not_an_image",
            f"{name!r} is not a readable image ({type(exc).__name__}: {clip(str(exc))})",
            where,
        ) from None


# ---------------------------------------------------------------- the model


def model_key(job: dict[str, Any], onnx_meta: dict[str, Any]) -> tuple[str, str, str]:
    """The cache key of a job's student: job id, attempt folder, sha256 of its ONNX file."""
    return (job["id"], job.get("output") or "", onnx_meta["sha256"])


def load_model(settings: Settings, job: dict[str, Any]) -> Model:
    """Read `student.onnx` and `student/config.json` of the job (artifact root or bucket,
    app/downloads.py) and start an onnxruntime session. Raises ApiError 409 `no_onnx_model` when a
    file is gone, 500 `model_load_failed` when onnxruntime or the config refuses them,
    StorageUnavailable (-> 503) when the bucket does not answer. Blocking."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix=".spkd-predict-") as tmp:
        try:
            onnx_bytes = downloads.member_file(settings, job, ONNX, Path(tmp)).read_bytes()
            config = json.loads(downloads.member_file(settings, job, CONFIG, Path(tmp)).read_text())
        except FileNotFoundError:
            raise ApiError(
                409, "no_onnx_model", f"job {job['id']} lists {ONNX} but its file is gone; rerun the job"
            ) from None
    try:
        cfg = EvalConfig.from_hub_config(config)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a file onnxruntime cannot run, a config timm did not write
        raise ApiError(
            500,
            "model_load_failed",
            f"the job's {ONNX} could not be loaded ({type(exc).__name__}: {clip(str(exc), 300)})",
        ) from None
    labels = [str(v) for v in config.get("label_names") or []]
    return Model(
        session=session,
        input_name=session.get_inputs()[0].name,
        labels=labels,
        cfg=cfg,
        nbytes=len(onnx_bytes),
        architecture=str(config.get("architecture", "")),
    )


def classify(model: Model, images: list[Image.Image], top_k: int) -> list[list[tuple[int, float]]]:
    """Top-k (class index, probability) per image, highest first: softmax of the logits in
    float64. Blocking."""
    x = eval_batch(images, model.cfg)
    (logits,) = model.session.run(None, {model.input_name: x})
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(top_k, probs.shape[1])
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(int(i), float(row[i])) for i in order])
    return out
