"""Model creation with timm: a model, its new head, and its data config (normalisation, crop)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

import timm
import timm.models
import torch
from timm.data import resolve_data_config

from spkd.common.errors import SpkdError
from spkd.common.spec import TEACHER_SIZE_CAP, TEACHER_SIZE_FACTOR


@dataclass(frozen=True)
class DataConfig:
    """What a model expects of its input; saved in each model folder's config.json."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model_name(name: str, field: str) -> None:
    """Raise a clear error, with close matches, when timm does not know `name`."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SpkdError("unknown_model", f"timm has no model named {name!r}{hint}", field)


def create(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    field: str | None = None,
    image_size: int | None = None,
) -> torch.nn.Module:
    """Build `name` with a fresh `num_classes` head (pretrained=True downloads timm's hub weights).

    Models with a fixed input size (most ViTs) are built for the job's image size; timm resamples
    their position embeddings when it loads pretrained weights.
    """
    check_model_name(name, field or "model")
    return timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, **create_kwargs(name, image_size)
    )


def create_kwargs(name: str, image_size: int | None) -> dict[str, Any]:
    """Extra timm.create_model arguments for this image size (config.json's model_args carry them)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if image_size and cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size)[-1] != image_size:
        return {"img_size": image_size}
    return {}


def job_image_size(spec: Any) -> int:
    """One image size per job (a common.spec.JobSpec): train.image_size, else the student's
    pretrained input size (224 when timm has no pretrained config for it)."""
    if spec.train.image_size:
        return spec.train.image_size
    cfg = timm.models.get_pretrained_cfg(spec.student.model)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def teacher_image_size(spec: Any) -> int:
    """The teacher's input size in px for a job (a common.spec.JobSpec): teacher.image_size when
    a number, else (`auto`) the teacher's pretrained input size (224 when timm has none), capped
    at TEACHER_SIZE_FACTOR x the student's size and at TEACHER_SIZE_CAP, never below 16."""
    size = spec.teacher.image_size
    if isinstance(size, int):
        return size
    cfg = timm.models.get_pretrained_cfg(spec.teacher.model)
    pretrained = int(cfg.input_size[-1]) if cfg is not None else 224
    cap = min(TEACHER_SIZE_FACTOR * job_image_size(spec), TEACHER_SIZE_CAP)
    return max(16, min(pretrained, cap))


def data_config(model: torch.nn.Module, image_size: int | None = None) -> DataConfig:
    """The model's pretrained data config, with the job's square image size when given."""
    cfg = resolve_data_config({}, model=model)
    size = tuple(cfg["input_size"])
    if image_size is not None:
        size = (3, image_size, image_size)
    return DataConfig(
        input_size=(int(size[0]), int(size[1]), int(size[2])),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        crop_mode=str(cfg.get("crop_mode", "center")),
    )


def is_cnn(model: torch.nn.Module) -> bool:
    """True when the model's main layers are convolutions (channels_last helps those)."""
    convs = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return total > 0 and convs / total > 0.5


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
