"""The job spec: one pydantic schema for REST (JSON) and `spkd run` (YAML). Torch-free.

Every field has a sensible default and a bound, unknown fields are rejected, so a typo is a
clear 422 / CLI error instead of a silently ignored setting (docs/job-spec.md).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# `hub` | `none` | `package` | `job:<id>` | a path to a .safetensors/.pth file.
WEIGHT_KEYWORDS = ("hub", "none", "package")
JOB_WEIGHTS = re.compile(r"^job:[A-Za-z0-9_-]{1,64}$")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

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

    epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=1000)] = Field(
        default="auto",
        description="epochs of fine-tuning; 'auto' (default): until the selection accuracy has not "
        "improved for `patience` epochs (at most `max_epochs`), keeping the best epoch",
    )
    lr: Annotated[float | None, Field(gt=0, le=10)] = Field(
        default=None, description="learning rate; default: train.lr"
    )
    patience: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3, description="epochs: auto: stop after this many epochs without a better selection accuracy"
    )
    max_epochs: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=30, description="epochs: auto: at most this many epochs (the learning-rate schedule's length)"
    )
    body_lr_scale: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0,
        description="the pretrained body's learning rate as a fraction of `lr`; the new classifier head "
        "always trains at `lr`. 1.0 (default): one rate for all, the measured schedule so far; below "
        "1 keeps more of the ImageNet features while the fresh head catches up",
    )

    @property
    def planned_epochs(self) -> int:
        """The epochs the schedule spans: `epochs`, or `max_epochs` for auto."""
        return self.max_epochs if self.epochs == "auto" else self.epochs


# teacher.image_size: auto never asks more than this factor over the student's size nor this many px
TEACHER_SIZE_FACTOR = 2
TEACHER_SIZE_CAP = 384


class TeacherSpec(_Strict):
    model: ModelName = Field(examples=["tf_efficientnet_lite2"])
    weights: Weights = Field(default="hub", examples=["package"])
    finetune: FinetuneSpec | None = Field(
        default=None, description="omit when the teacher is already fine-tuned on the target classes"
    )
    image_size: Annotated[int, Field(ge=16, le=1024)] | Literal["auto"] = Field(
        default="auto",
        description="the teacher's input size (fine-tuning, distillation, evaluation): `auto` = its "
        f"pretrained input size, at most {TEACHER_SIZE_FACTOR} x the student's size and at most "
        f"{TEACHER_SIZE_CAP} px (beyond that the teacher's cost grows with the pixels, and its "
        "view is upsampled from a crop the student sees at a fraction of it); a number: that size; "
        "equal to train.image_size: both models see the same pixels",
        examples=["auto", 260],
    )


class StudentSpec(_Strict):
    model: ModelName = Field(examples=["tf_efficientnet_lite0"])
    weights: Weights = Field(default="hub", examples=["package"])


# torchvision's image-classification datasets that download themselves (torchvision.datasets), and
# FakeData (generated, no download). A fixed list: the API validates names without importing torch.
TORCHVISION_DATASETS = (
    "CIFAR10",
    "CIFAR100",
    "Caltech101",
    "Country211",
    "DTD",
    "EuroSAT",
    "FGVCAircraft",
    "FakeData",
    "FashionMNIST",
    "Flowers102",
    "Food101",
    "GTSRB",
    "KMNIST",
    "MNIST",
    "OxfordIIITPet",
    "PCAM",
    "RenderedSST2",
    "STL10",
    "SVHN",
    "StanfordCars",
)


class DatasetSpec(_Strict):
    """Exactly one of four sources: `id` (an uploaded dataset), `path` (a folder under the server's
    data root), `hf` (a Hugging Face dataset name, or a `save_to_disk` folder under the data root)
    or `torchvision` (a torchvision classification dataset the workers download)."""

    id: str | None = Field(default=None, pattern=r"^ds_[A-Za-z0-9_-]{1,64}$")
    path: str | None = None
    hf: str | None = Field(default=None, min_length=1, max_length=300, examples=["beans"])
    torchvision: str | None = Field(
        default=None,
        description="a torchvision classification dataset class that downloads, e.g. CIFAR10, Flowers102 "
        "(one of spkd.common.spec.TORCHVISION_DATASETS); `split` picks one split",
        examples=["CIFAR10"],
    )
    split: str | None = Field(
        default=None, max_length=100, description="hf: train on this split only (default: all splits)"
    )
    image_column: str = Field(default="image", max_length=100, description="hf: the image column")
    label_column: str = Field(default="label", max_length=100, description="hf: the ClassLabel column")
    revision: str | None = Field(default=None, max_length=100, description="hf: a hub branch, tag or commit")
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.2, description="held-out share when the folder has no train/ and val/ split"
    )
    selection_fraction: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.1,
        description="share of train held out (stratified, seeded) to choose the best epoch, the weights "
        "and the shipped student when the dataset has no test/ split; 0: no selection, last epoch ships",
    )
    ship_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.0,
        description="share of the selection split (stratified, seeded) that only decides which student "
        "ships, by evidence (models/results/ship.py), among the baseline, the distilled student and their "
        "weight average; the rest picks best epochs and weights. 0 (default): the whole selection split "
        "does both and the distilled student ships when its selection accuracy is strictly higher",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if sum(x is not None for x in (self.id, self.path, self.hf, self.torchvision)) != 1:
            raise ValueError("dataset needs exactly one of 'id', 'path', 'hf' or 'torchvision'")
        if self.torchvision is not None and self.torchvision not in TORCHVISION_DATASETS:
            raise ValueError(
                f"dataset.torchvision {self.torchvision!r} is not one of the classification datasets spkd "
                f"can download: {', '.join(TORCHVISION_DATASETS)}"
            )
        return self


class LayerPair(_Strict):
    """A (teacher layer, student layer) pair for SP; names from each model's `feature_info`."""

    teacher: str
    student: str
    weight: Annotated[float, Field(gt=0, le=1e6)] = 1.0


SP_MAX, KD_MAX = 1e6, 1e3
SpWeight = Annotated[float, Field(ge=0, le=SP_MAX)]
KdWeight = Annotated[float, Field(ge=0, le=KD_MAX)]
AUTO_WEIGHT = "auto"
MAX_CANDIDATES = 8


class RkdOptions(_Strict):
    """Relational KD (Park et al., CVPR 2019) on the pooled embeddings: its two loss weights."""

    distance_weight: Annotated[float, Field(ge=0, le=1e4)] = Field(
        default=25.0, description="lambda_D, the weight of the distance loss (the paper's 25)"
    )
    angle_weight: Annotated[float, Field(ge=0, le=1e4)] = Field(
        default=50.0, description="lambda_A, the weight of the angle loss (the paper's 50)"
    )


class DistOptions(_Strict):
    """DIST (Huang et al., NeurIPS 2022): Pearson-correlation relations of the softened logits."""

    beta: Annotated[float, Field(ge=0, le=1e3)] = Field(
        default=1.0, description="weight of the inter-class relation loss (per image, across classes)"
    )
    gamma: Annotated[float, Field(ge=0, le=1e3)] = Field(
        default=1.0, description="weight of the intra-class relation loss (per class, across the batch)"
    )
    tau: Annotated[float, Field(gt=0, le=100)] = Field(default=1.0, description="softmax temperature")


# The distillation methods a job adds under `distill.methods`, by their registry name in
# models/methods/, with the options each takes. `sp` and `kd` have their own fields above.
METHOD_OPTIONS: dict[str, type[_Strict]] = {"rkd": RkdOptions, "dist": DistOptions}
MethodOptions = RkdOptions | DistOptions  # the union of METHOD_OPTIONS' values
FIELD_METHODS = {"sp": "distill.sp_weight", "kd": "distill.kd_weight"}


def _check_methods(value: object) -> object:
    """{name: options or null} -> {name: validated options}; a clear error for an unknown name."""
    if not isinstance(value, dict):
        return value  # pydantic's own "must be a dictionary" error
    out = {}
    for name, options in value.items():
        if name in FIELD_METHODS:
            raise ValueError(f"{name} is set with {FIELD_METHODS[name]}, not under distill.methods")
        if name not in METHOD_OPTIONS:
            raise ValueError(
                f"unknown distillation method {name!r}; known methods: {', '.join(sorted(METHOD_OPTIONS))} "
                f"(and {', '.join(FIELD_METHODS)}, set with {' and '.join(FIELD_METHODS.values())})"
            )
        try:
            out[name] = METHOD_OPTIONS[name].model_validate({} if options is None else options)
        except ValidationError as exc:
            raise ValueError(
                "; ".join(f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            ) from None
    return out


class DistillSpec(_Strict):
    sp_weight: Literal["auto"] | SpWeight | list[SpWeight] = Field(
        default=AUTO_WEIGHT,
        description="'auto': set at the start of distillation so SP is a fixed share of the cross-entropy; "
        "a number: used as given (at train.batch_size); a list: candidates searched on the selection split",
    )
    layers: Literal["auto"] | list[LayerPair] = Field(
        default="auto", description="'auto': the last stage before pooling, as in the paper"
    )
    kd_weight: Literal["auto"] | KdWeight | list[KdWeight] = Field(
        default=0.0,
        description="0: off; 'auto': KD set to a fixed share of the cross-entropy; a number; or a list: "
        "candidates searched on the selection split (with sp_weight's, when that is a list too)",
    )
    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0
    kd_standardize: bool = Field(
        default=False,
        description="KD on Z-scored logits (Sun et al., CVPR 2024: logit standardisation), teacher and "
        "student alike, so the student matches the logits' relations, not their scale",
    )
    methods: Annotated[dict[str, MethodOptions], BeforeValidator(_check_methods)] = Field(
        default_factory=dict,
        description="more distillation methods, added to SP/KD, by name with their options: "
        "{rkd: {distance_weight: 25, angle_weight: 50}} (Relational KD on the pooled embeddings)",
        examples=[{"rkd": {"distance_weight": 25.0, "angle_weight": 50.0}}],
    )
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

    @field_validator("sp_weight", "kd_weight", mode="wrap")
    @classmethod
    def _weight(cls, v, handler, info):
        # one clear message (and field) instead of one error per member of the union
        name = info.field_name
        bound = f"0 to {SP_MAX:g}" if name == "sp_weight" else f"0 (off) to {KD_MAX:g}"
        try:
            v = handler(v)
        except ValidationError:
            raise ValueError(
                f"{name} must be 'auto', a number from {bound}, or a list of 2 to "
                f"{MAX_CANDIDATES} such numbers (candidates searched on the selection split)"
            ) from None
        if isinstance(v, list):
            if not 2 <= len(v) <= MAX_CANDIDATES or len(set(v)) != len(v):
                raise ValueError(f"a list of {name} candidates needs 2 to {MAX_CANDIDATES} distinct numbers")
            return sorted(v)
        return v

    @model_validator(mode="after")
    def _search_size(self):
        n = len(self.sp_weight) if isinstance(self.sp_weight, list) else 1
        m = len(self.kd_weight) if isinstance(self.kd_weight, list) else 1
        if n * m > MAX_CANDIDATES:
            raise ValueError(
                f"sp_weight x kd_weight lists make {n * m} candidate pairs; at most {MAX_CANDIDATES} "
                "are searched: shorten one of the lists"
            )
        return self

    @property
    def searching(self) -> bool:
        """Whether the distill stage first searches its weights (a list in sp_weight or kd_weight)."""
        return isinstance(self.sp_weight, list) or isinstance(self.kd_weight, list)

    @property
    def sp_on(self) -> bool:
        """Whether the distill stage may use SP (auto, a list, or a number above 0)."""
        w = self.sp_weight
        return isinstance(w, str | list) or w > 0

    @property
    def kd_on(self) -> bool:
        """Whether the distill stage may use KD (auto, a list, or a number above 0)."""
        w = self.kd_weight
        return isinstance(w, str | list) or w > 0

    @property
    def uses_teacher(self) -> bool:
        """Whether the distill stage runs the teacher (SP, KD or any method under `methods`)."""
        return self.sp_on or self.kd_on or bool(self.methods)


def _two_per_batch(value: object) -> object:
    # before the bound check, so a batch of one gets the reason rather than a bare "at least 2"
    if isinstance(value, int) and not isinstance(value, bool) and value < 2:
        raise ValueError(
            f"batch_size must be at least 2, got {value}: SP compares the images of a batch with "
            "each other (one image gives a loss of 0) and BatchNorm needs 2 images per batch"
        )
    return value


MAX_DEVICES = 64  # one host's worth; SPKD_MAX_DEVICES sets what a service accepts


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
    devices: Annotated[int, Field(ge=1, le=MAX_DEVICES)] = Field(
        default=1,
        description="devices (GPUs; gloo ranks on a CPU worker) one job trains on, data-parallel "
        "with torch.distributed; batch_size stays the global batch and must split evenly, at least "
        "2 images per device",
    )
    sync_batchnorm: bool = Field(
        default=True,
        description="with devices > 1 on GPUs: BatchNorm statistics over the global batch "
        "(SyncBatchNorm), so a job trains as on one device; false: each device's own share",
    )

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainSpec:
        if self.batch_size % self.devices or self.batch_size // self.devices < 2:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into {self.devices} equal shares of at "
                f"least 2 images: train.batch_size is the global batch over train.devices; use a "
                f"multiple of {self.devices} that is at least {2 * self.devices}"
            )
        return self


class ExportSpec(_Strict):
    """What the export stage ships besides the fp32 models (models/results/deploy.py)."""

    measure: bool = Field(
        default=True,
        description="measure what the teacher, the baseline and the shipped student cost (parameters, "
        "FLOPs, ONNX sizes, onnxruntime latency: metrics.json `deploy`, the report, the model cards) and "
        "write student.int8.onnx; false skips all of it (seconds to minutes of the export stage)",
    )
    int8: bool = Field(
        default=True,
        description="also write student.int8.onnx: onnxruntime post-training static quantisation "
        "(QDQ, per-channel weights, calibrated on training images); needs `measure`",
    )
    int8_max_drop: Annotated[float, Field(ge=0, le=100)] = Field(
        default=1.0,
        description="accuracy points the int8 model may lose against fp32 on the report split; past "
        "it the model is still written, and the report and a warning event say not to use it",
    )


TRACKING_URI_MAX = 2000
INTEGRATIONS_MAX = 4


def _check_tracking_uri(value: str | None) -> str | None:
    """http(s) only (a file: or database URI would write on the worker's disks) and no
    credentials (the spec is stored, returned by the API and copied into metrics.json)."""
    if value is None:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(f"not a URL: {value[:100]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("tracking_uri must be an http:// or https:// URL of an MLflow tracking server")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "tracking_uri must not carry credentials: put them in the worker's environment "
            "(MLFLOW_TRACKING_USERNAME/PASSWORD or SPKD_MLFLOW_TRACKING_URI)"
        )
    return value


class MlflowIntegration(_Strict):
    """Log the job as one MLflow run (params, per-epoch metrics, artifacts)."""

    type: Literal["mlflow"]
    experiment: Text | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="MLflow experiment, created when missing; default: the server's SPKD_MLFLOW_EXPERIMENT",
    )
    tracking_uri: Annotated[str | None, AfterValidator(_check_tracking_uri)] = Field(
        default=None,
        max_length=TRACKING_URI_MAX,
        description="http(s) URL of the MLflow server; default: the server's SPKD_MLFLOW_TRACKING_URI",
    )


METADATA_MAX_KEYS = 32
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
METADATA_VALUE_MAX = 512

# What no free text a user stores and others see (a job's name and metadata, a dataset's name, an
# Idempotency-Key) may hold: the C0/C1 control characters (Unicode category Cc: NUL, ESC, CR, LF,
# and TAB too, since every such field is shown on one line), the line and paragraph separators
# U+2028/U+2029, and the bidirectional controls that reorder what a reader sees (U+202E makes
# "gpj.exe" read "exe.jpg"): U+061C, U+200E/U+200F, U+202A-U+202E, U+2066-U+2069.
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CHAR_NAMES = {"\x00": "NUL", "\t": "TAB", "\n": "LF", "\r": "CR", "\x1b": "ESC", "\x7f": "DEL"}


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as free text (see _UNSAFE_TEXT), or None when it can: names the
    first offending character and its position (0-based, in characters)."""
    m = _UNSAFE_TEXT.search(value)
    if m is None:
        return None
    ch = m.group()
    name = _CHAR_NAMES.get(ch) or unicodedata.name(ch, "a control character")
    return (
        f"contains U+{ord(ch):04X} ({name}) at position {m.start()}: control characters, line "
        "breaks and bidirectional controls are not allowed in text"
    )


def _check_text(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A free-text field: refused (422 naming the field) when it holds a character text_problem names.
Text = Annotated[str, AfterValidator(_check_text)]


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"at most {METADATA_MAX_KEYS} metadata keys, got {len(value)}")
    for k, v in value.items():
        if not METADATA_KEY.match(k):
            shown = k if len(k) <= 100 else k[:99] + "\u2026"
            raise ValueError(f"metadata key {shown!r}: 1-64 characters of letters, digits, '_', '.', '-'")
        if len(v) > METADATA_VALUE_MAX:
            raise ValueError(f"metadata[{k!r}]: at most {METADATA_VALUE_MAX} characters, got {len(v)}")
        problem = text_problem(v)
        if problem:
            raise ValueError(f"metadata[{k!r}] {problem}")
    return value


class JobSpec(_Strict):
    name: Text | None = Field(
        default=None, min_length=1, max_length=200, description="a label of yours; filter the job list by it"
    )
    metadata: Annotated[dict[str, str], AfterValidator(_check_metadata)] = Field(
        default_factory=dict,
        description="free key/value strings of yours (at most 32 keys, values up to 512 characters); "
        "filter the job list with ?metadata=key:value",
    )
    teacher: TeacherSpec
    student: StudentSpec
    dataset: DatasetSpec
    distill: DistillSpec = DistillSpec()
    train: TrainSpec = TrainSpec()
    baseline: bool = Field(
        default=True, description="also fine-tune the student without SP to report the gain"
    )
    export: ExportSpec = ExportSpec()
    integrations: list[MlflowIntegration] = Field(
        default_factory=list,
        max_length=INTEGRATIONS_MAX,
        description="where else the job reports: [{type: mlflow, experiment: NAME, tracking_uri: URL}]",
    )

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a job spec is a YAML mapping with teacher, student and dataset")
        return cls.model_validate(data)


@dataclass(frozen=True)
class StageInfo:
    """One stage of a job as the API, the dashboard and the report describe it. The engine's
    registry (models/stages/__init__.py) takes each stage's plan and epochs from here and adds its
    body and files; a test checks the two lists agree (docs/architecture.md#a-stage)."""

    name: str  # the `stage` of events, progress and the job record
    title: str  # how people read it (the dashboard)
    planned_by: str | None = None  # the spec field that turns it on (off when None or false); None: always
    epochs_from: str | None = None  # the spec field holding its epochs; None: no training steps
    result: str | None = None  # the metrics block whose accuracy it yields (teacher, baseline, distilled)

    @property
    def trains(self) -> bool:
        """A training stage: it runs epochs and reports a selection accuracy at each epoch's end."""
        return self.epochs_from is not None

    def planned(self, spec: JobSpec) -> bool:
        """Does this job run the stage?"""
        return self.planned_by is None or bool(_field(spec, self.planned_by))

    def epochs(self, spec: JobSpec) -> int:
        """The stage's epochs in this job (0 for a stage without training steps); for `epochs: auto`
        (teacher.finetune) the most it may train, its section's `planned_epochs`."""
        if not self.epochs_from:
            return 0
        parent, _, leaf = self.epochs_from.rpartition(".")
        section = _field(spec, parent) if parent else spec
        if section is None:
            return 0
        planned = getattr(section, f"planned_{leaf}", None)
        return int(planned if planned is not None else getattr(section, leaf) or 0)


def _field(spec: JobSpec, dotted: str) -> object:
    """spec.<dotted> ("teacher.finetune.epochs"), or None where a part along the way is None."""
    value: object = spec
    for part in dotted.split("."):
        value = getattr(value, part) if value is not None else None
    return value


# Every stage, in run order: the one list of them (the engine's registry, the API's GET /v1/stages,
# the dashboard and the report's colours all follow it).
STAGE_INFO: tuple[StageInfo, ...] = (
    StageInfo(
        "teacher_finetune",
        "Teacher fine-tune",
        planned_by="teacher.finetune",
        epochs_from="teacher.finetune.epochs",
        result="teacher",
    ),
    StageInfo(
        "baseline", "Baseline student", planned_by="baseline", epochs_from="train.epochs", result="baseline"
    ),
    StageInfo("distill", "Distillation", epochs_from="train.epochs", result="distilled"),
    StageInfo("evaluate", "Evaluation"),
    StageInfo("export", "Export"),
)
STAGES = tuple(stage.name for stage in STAGE_INFO)


EXAMPLE_SPEC = {
    "teacher": {"model": "tf_efficientnet_lite2", "weights": "package", "finetune": {"epochs": "auto"}},
    "student": {"model": "tf_efficientnet_lite0", "weights": "package"},
    "dataset": {"path": "hymenoptera"},
    "distill": {"sp_weight": "auto", "layers": "auto", "kd_weight": 0.0, "temperature": 4.0},
    "train": {"epochs": 15, "batch_size": 64, "lr": 0.01, "image_size": 224, "seed": 0, "precision": "auto"},
    "baseline": True,
}
