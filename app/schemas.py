"""Response models of the v1 API (request bodies reuse common.spec.JobSpec). Torch-free."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from spkd.common.spec import EXAMPLE_SPEC

Status = Literal["queued", "validating", "running", "paused", "succeeded", "failed", "cancelled"]

JOB_ID_EXAMPLE = "job_01jdx3k4m9a8b7c6d5e4"


class ErrorInfo(BaseModel):
    code: str = Field(examples=["unknown_model"])
    message: str = Field(examples=["teacher.model: timm has no model 'resnet5O'; close matches: resnet50"])
    field: str | None = Field(default=None, examples=["teacher.model"])
    status: str | None = Field(
        default=None, description="the job's status, on a 409 from cancel, pause, resume or delete"
    )


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "error": {
                    "code": "job_not_found",
                    "message": "no job 'job_x' for this API key",
                    "field": None,
                }
            }
        }
    )
    error: ErrorInfo


class ProgressOut(BaseModel):
    stage: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    images_per_sec: float | None = None
    eta_s: float | None = None
    loss: float | None = None
    updated_at: datetime | None = None  # stored as unix seconds; shown like every API time


def _iso(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


class Job(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": JOB_ID_EXAMPLE,
                "object": "job",
                "status": "running",
                "stage": "distill",
                "progress": {
                    "stage": "distill",
                    "epoch": 3,
                    "epochs": 15,
                    "step": 12,
                    "steps": 40,
                    "images_per_sec": 812.5,
                    "eta_s": 431.0,
                    "loss": 0.42,
                },
                "eta": "2026-11-27T22:10:00Z",
                "created_at": "2026-11-27T21:58:00Z",
                "spec": EXAMPLE_SPEC,
                "metrics": None,
                "error": None,
            }
        }
    )

    id: str
    object: Literal["job"] = "job"
    name: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    status: Status
    stage: str | None = None
    progress: ProgressOut | None = None
    eta: datetime | None = Field(default=None, description="estimated end of the whole run")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested: bool = False
    pause_requested: bool = Field(
        default=False, description="a pause was asked for; the job stops at its next training step"
    )
    paused_at: datetime | None = Field(default=None, description="when it paused (status `paused`)")
    attempts: int = 0
    spec: dict[str, Any]
    warnings: list[str] = Field(
        default_factory=list,
        description="what the worker's validation found before training (the spec against the data "
        "and models); warnings raised while the job runs are `warning` events",
    )
    metrics: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @classmethod
    def from_store(cls, job: dict[str, Any]) -> Job:
        progress = job.get("progress") or None
        eta = None
        if progress and job["status"] == "running" and progress.get("eta_s") is not None:
            eta = _iso((progress.get("updated_at") or job["updated_at"]) + progress["eta_s"])
        spec = job.get("spec") or {}
        return cls(
            id=job["id"],
            name=spec.get("name"),
            metadata=spec.get("metadata") or {},
            status=job["status"],
            stage=job.get("stage") or None,
            progress=progress,
            eta=eta,
            created_at=_iso(job["created_at"]),
            started_at=_iso(job.get("started_at")),
            finished_at=_iso(job.get("finished_at")),
            cancel_requested=job.get("cancel_requested", False),
            pause_requested=job.get("pause_requested", False),
            paused_at=_iso(job.get("paused_at")) if job["status"] == "paused" else None,
            attempts=job.get("attempts", 0),
            spec=spec,
            warnings=job.get("warnings") or [],
            metrics=job.get("metrics"),
            error=job.get("error"),
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    next_cursor: str | None = Field(default=None, description="pass as ?after= for the next page")


class Event(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "1764280000000-0",
                "created_at": "2025-11-27T21:46:40Z",
                "kind": "epoch_end",
                "message": "distill epoch 3/15: train loss 0.4120, selection acc 0.9120, 812.0 img/s",
                "data": {
                    "stage": "distill",
                    "epoch": 3,
                    "epochs": 15,
                    "selection_acc": 0.912,
                    "selection_loss": 0.301,
                    "eval_split": "selection",
                },
            }
        }
    )
    id: str = Field(description="stream id; send as Last-Event-ID or ?after= to resume")
    created_at: datetime
    kind: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    attempt: int | None = Field(
        None, description="the worker attempt that wrote it (its fencing token); null for API events"
    )

    @classmethod
    def from_store(cls, event: dict[str, Any]) -> Event:
        return cls(
            id=event["id"],
            created_at=_iso(event["ts"]) or datetime.fromtimestamp(0, UTC),
            kind=event["kind"],
            message=event["message"],
            data=event["data"],
            attempt=event.get("attempt"),
        )


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    status: Status
    has_more: bool = Field(description="more events follow the last one returned (ask again with ?after=)")
    next_cursor: str | None = None


class Artifact(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "name": "student/model.safetensors",
                "size": 13584112,
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            }
        }
    )
    name: str
    size: int
    sha256: str


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Artifact]


class Dataset(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "ds_01jdx3k4m9a8b7c6d5e4",
                "object": "dataset",
                "name": "hymenoptera",
                "created_at": "2026-11-27T21:50:00Z",
                "layout": "split",
                "classes": ["ants", "bees"],
                "counts": {"train": {"ants": 123, "bees": 121}, "val": {"ants": 70, "bees": 83}},
                "num_images": 397,
                "size_bytes": 47286322,
                "rejected": [{"path": "hymenoptera/SOURCE.md", "reason": "not inside a class folder"}],
                "rejected_total": 1,
            }
        }
    )
    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    created_at: datetime
    status: Literal["validating", "ready", "failed"] = Field(
        default="ready", description="large uploads are `validating` (202) until scanned"
    )
    error: dict[str, str] | None = Field(default=None, description="{code, message} when failed")
    layout: Literal["split", "flat"] | None = Field(default=None, description="null until ready")
    classes: list[str]
    counts: dict[str, dict[str, int]] = Field(
        description="split ('train', 'val', 'test' of split folders; 'all': class folders) -> class -> images"
    )
    num_images: int
    size_bytes: int
    rejected: list[dict[str, str]] = Field(description="skipped files with the reason")
    rejected_total: int

    @classmethod
    def from_store(cls, ds: dict[str, Any]) -> Dataset:
        data = {k: v for k, v in ds.items() if k != "owner"}
        data["created_at"] = _iso(ds["created_at"])
        return cls(**data)


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Dataset]
    has_more: bool
    next_cursor: str | None = None


class ModelInfo(BaseModel):
    name: str
    pretrained_tags: list[str]
    weights: list[str] = Field(description="weight sources this server can use: none, package, hub")


class WeightFile(BaseModel):
    path: str
    size: int


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "object": "list",
                "total": 1,
                "data": [
                    {
                        "name": "tf_efficientnet_lite0",
                        "pretrained_tags": ["in1k"],
                        "weights": ["none", "package", "hub"],
                    }
                ],
                "weight_files": [{"path": "/weights/teacher.safetensors", "size": 24000000}],
            }
        }
    )
    object: Literal["list"] = "list"
    total: int
    data: list[ModelInfo]
    weight_files: list[WeightFile]


class StageOut(BaseModel):
    name: str = Field(description="the `stage` of a job's record, progress and events", examples=["distill"])
    title: str = Field(description="how the dashboard names it", examples=["Distillation"])
    trains: bool = Field(description="runs epochs: `epoch_end` events, a curve and an accuracy per epoch")
    planned_by: str | None = Field(
        description="the job spec field that turns it on (off when null or false); null: every job runs it",
        examples=["baseline"],
    )
    epochs_from: str | None = Field(
        description="the job spec field holding its epochs; null: no training steps",
        examples=["train.epochs"],
    )
    result: str | None = Field(
        description="the block of a job's `metrics` its accuracy goes to (teacher, baseline, distilled)",
        examples=["distilled"],
    )


class StageList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "object": "list",
                "data": [
                    {
                        "name": "baseline",
                        "title": "Baseline student",
                        "trains": True,
                        "planned_by": "baseline",
                        "epochs_from": "train.epochs",
                        "result": "baseline",
                    },
                    {
                        "name": "export",
                        "title": "Export",
                        "trains": False,
                        "planned_by": None,
                        "epochs_from": None,
                        "result": None,
                    },
                ],
            }
        }
    )
    object: Literal["list"] = "list"
    data: list[StageOut] = Field(description="every stage a job can have, in the order a job runs them")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready", "not_ready"]
    redis: bool
    workers: int
    max_devices: int = Field(
        0,
        description="the most devices one live worker owns (`spkd worker --gpus`): a job asking for "
        "more `train.devices` waits in its queue until such a worker starts",
        examples=[1],
    )
    detail: str | None = None


class LabelScore(BaseModel):
    label: str = Field(examples=["bees"])
    index: int = Field(description="the class index (position in the job's class list)", examples=[1])
    probability: float = Field(ge=0, le=1, examples=[0.93])


class ImagePrediction(BaseModel):
    file: str = Field(description="the uploaded file's name", examples=["photo.jpg"])
    top: list[LabelScore] = Field(description="the top_k classes, most probable first")


class PredictModel(BaseModel):
    architecture: str = Field(
        description="timm model name of the shipped student", examples=["tf_efficientnet_lite0"]
    )
    trained: str | None = Field(
        description="which student shipped: distilled or baseline (metrics.json `shipped`)",
        examples=["distilled"],
    )
    file: str = Field(examples=["student.onnx"])
    image_size: int = Field(examples=[224])


class Prediction(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "job_id": JOB_ID_EXAMPLE,
                "model": {
                    "architecture": "tf_efficientnet_lite0",
                    "trained": "distilled",
                    "file": "student.onnx",
                    "image_size": 224,
                },
                "predictions": [
                    {
                        "file": "photo.jpg",
                        "top": [
                            {"label": "bees", "index": 1, "probability": 0.93},
                            {"label": "ants", "index": 0, "probability": 0.07},
                        ],
                    }
                ],
            }
        }
    )
    job_id: str
    model: PredictModel
    predictions: list[ImagePrediction]
