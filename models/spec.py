"""The job spec: one pydantic schema for REST (JSON) and `spkd run` (YAML). Torch-free.

Every field has a sensible default and a bound, unknown fields are rejected, so a typo is a
clear 422 / CLI error instead of a silently ignored setting (DESIGN.md section 3).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

# `hub` | `none` | `package` | `job:<id>` | a path to a .safetensors/.pth file.
WEIGHT_KEYWORDS = ("hub", "none", "package")
JOB_WEIGHTS = re.compile(r"^job:[A-Za-z0-9_-]{1,64}$")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

STAGES = ("teacher_finetune", "baseline", "distill", "evaluate", "export")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class _Strict(BaseModel):
    # NaN/Infinity parse from JSON and YAML (.nan, .inf) and pass `gt`/`le` bounds on some fields
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_weights(value: str) -> str:
    value = value.strip()
    if value in WEIGHT_KEYWORDS or JOB_WEIGHTS.match(value):
        return value
    if value.lower().endswith(WEIGHT_FILE_SUFFIXES):
        return value
    raise ValueError(
        "weights must be 'hub', 'none', 'package', 'job:<job id>' or a path to a "
        f"{'/'.join(WEIGHT_FILE_SUFFIXES)} file, got {value!r}"
    )


def _check_model_name(value: str) -> str:
    if not MODEL_NAME.match(value):
        raise ValueError(f"not a timm model name: {value!r}")
    return value


ModelName = Annotated[str, AfterValidator(_check_model_name)]
Weights = Annotated[str, AfterValidator(_check_weights)]


class FinetuneSpec(_Strict):
    """Fine-tune the teacher on the target set before distillation."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 15
    lr: Annotated[float | None, Field(gt=0, le=10)] = Field(
        default=None, description="learning rate; default: train.lr"
    )


class TeacherSpec(_Strict):
    model: ModelName = Field(examples=["tf_efficientnet_lite2"])
    weights: Weights = Field(default="hub", examples=["package"])
    finetune: FinetuneSpec | None = Field(
        default=None, description="omit when the teacher is already fine-tuned on the target classes"
    )


class StudentSpec(_Strict):
    model: ModelName = Field(examples=["tf_efficientnet_lite0"])
    weights: Weights = Field(default="hub", examples=["package"])


class DatasetSpec(_Strict):
    """Exactly one of `id` (an uploaded dataset) or `path` (a folder under the server's data root)."""

    id: str | None = Field(default=None, pattern=r"^ds_[A-Za-z0-9_-]{1,64}$")
    path: str | None = None
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.2, description="held-out share when the folder has no train/ and val/ split"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.id is None) == (self.path is None):
            raise ValueError("dataset needs exactly one of 'id' or 'path'")
        return self


class LayerPair(_Strict):
    """A (teacher layer, student layer) pair for SP; names from each model's `feature_info`."""

    teacher: str
    student: str
    weight: Annotated[float, Field(gt=0, le=1e6)] = 1.0


class DistillSpec(_Strict):
    sp_weight: Annotated[float, Field(ge=0, le=1e6)] = 3000.0
    layers: Literal["auto"] | list[LayerPair] = Field(
        default="auto", description="'auto': the last stage before pooling, as in the paper"
    )
    kd_weight: Annotated[float, Field(ge=0, le=1e3)] = 0.0
    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0
    teacher_cache: Literal["auto", "on", "off"] = Field(
        default="auto", description="reuse frozen-teacher features over a fixed set of augmented views"
    )
    teacher_views: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8,
        description="augmented views per image the teacher cache computes once and samples from; "
        "'auto' caches only when this is below train.epochs (fewer teacher passes) and it fits in memory",
    )

    @field_validator("layers")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("layers must be 'auto' or a non-empty list of {teacher, student} pairs")
        return v


def _two_per_batch(value: object) -> object:
    # before the bound check, so a batch of one gets the reason rather than a bare "at least 2"
    if isinstance(value, int) and not isinstance(value, bool) and value < 2:
        raise ValueError(
            f"batch_size must be at least 2, got {value}: SP compares the images of a batch with "
            "each other (one image gives a loss of 0) and BatchNorm needs 2 images per batch"
        )
    return value


class TrainSpec(_Strict):
    epochs: Annotated[int, Field(ge=1, le=1000)] = 15
    batch_size: Annotated[int, Field(ge=2, le=4096), BeforeValidator(_two_per_batch)] = 64
    lr: Annotated[float, Field(gt=0, le=10)] = 0.01
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-4
    image_size: Annotated[int | None, Field(ge=16, le=1024)] = Field(
        default=224, description="None: each model's pretrained input size"
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    num_workers: Annotated[int | None, Field(ge=0, le=64)] = Field(
        default=None, description="data loader processes; None: chosen from the host's cores"
    )


class JobSpec(_Strict):
    teacher: TeacherSpec
    student: StudentSpec
    dataset: DatasetSpec
    distill: DistillSpec = DistillSpec()
    train: TrainSpec = TrainSpec()
    baseline: bool = Field(
        default=True, description="also fine-tune the student without SP to report the gain"
    )

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a job spec is a YAML mapping with teacher, student and dataset")
        return cls.model_validate(data)


EXAMPLE_SPEC = {
    "teacher": {"model": "tf_efficientnet_lite2", "weights": "package", "finetune": {"epochs": 15}},
    "student": {"model": "tf_efficientnet_lite0", "weights": "package"},
    "dataset": {"path": "hymenoptera"},
    "distill": {"sp_weight": 3000, "layers": "auto", "kd_weight": 0.0, "temperature": 4.0},
    "train": {"epochs": 15, "batch_size": 64, "lr": 0.01, "image_size": 224, "seed": 0, "precision": "auto"},
    "baseline": True,
}
