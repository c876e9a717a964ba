"""One source of truth for configuration: environment variables prefixed SPKD_ (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPKD_", env_file=".env", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field(default="spkd", description="namespace of every Redis key spkd writes")
    api_keys: str = Field(default="", description="comma-separated API keys; empty refuses to serve")
    allow_open: bool = Field(default=False, description="serve without keys, on localhost only")
    data_root: Path = Path(".spkd/data")
    artifact_root: Path = Path(".spkd/artifacts")
    weights_roots: str = Field(default="", description="comma-separated folders weight files may come from")
    queue: str = "spkd"

    max_upload_bytes: int = 2 * 1024**3
    max_body_bytes: int = Field(
        default=1024**2,
        ge=1,
        description="largest request body of every route but dataset uploads (max_upload_bytes): "
        "413 before it is read",
    )
    upload_sync_max_bytes: int = Field(
        default=64 * 1024**2,
        ge=0,
        description="larger uploads answer 202 and are validated in the background (status validating)",
    )
    max_uncompressed_bytes: int = 8 * 1024**3
    max_files: int = 200_000
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb default

    # Longer than any job, or Redis hands an unacked job to a second worker
    # (docs/architecture.md#6-workers-and-gpus).
    visibility_timeout_s: int = 7 * 24 * 3600

    # Worker <-> store timing (service owner; additive).
    lease_ttl_s: float = Field(default=30.0, description="execution lease; renewed every ttl/3 by the worker")
    heartbeat_s: float = Field(default=5.0, description="how often a worker says it is alive")
    heartbeat_ttl_s: float = Field(default=20.0, description="a worker silent this long is not counted")
    cancel_poll_s: float = Field(
        default=0.5, description="how often the worker re-reads the cancel and pause flags"
    )
    hard_stop_s: float = Field(
        default=60.0,
        description="after a cancel or pause, kill the job's process if the engine has not stopped",
    )
    max_attempts: int = Field(
        default=3, description="runs of one job (worker lost -> resumed) before failing"
    )
    # A worker process (`spkd worker` sets these per GPU; docs/architecture.md#6-workers-and-gpus).
    worker_name: str = Field(
        default="", description="this worker's name in leases, events and /readyz; empty: <host>-<pid>"
    )
    device: str = Field(
        default="", description="torch device jobs run on (cuda:1, cpu); empty: the first GPU, else the CPU"
    )
    gpus: str = Field(
        default="",
        description="the device group one worker owns (`0,1,2,3`): it takes jobs of up to that many "
        "`train.devices`; empty: one device (SPKD_DEVICE)",
    )

    @property
    def worker_devices(self) -> int:
        """How many devices this worker owns (SPKD_GPUS; one without): the most train.devices it takes."""
        return len([g for g in self.gpus.split(",") if g.strip()]) or 1

    max_devices: int = Field(
        default=8,
        ge=1,
        le=64,
        description="the most `train.devices` a job may ask for (the largest worker group you run)",
    )
    data_path: Literal["auto", "loader"] = Field(
        default="auto",
        description="auto: decode a dataset that fits into memory once; loader: always a DataLoader",
    )
    hub_weights: bool = Field(default=True, description="False on hosts without internet: no 'hub' weights")
    hub_datasets: bool = Field(
        default=True,
        description="False on hosts without internet: dataset.hf only for saved folders, "
        "no dataset.torchvision",
    )
    idempotency_ttl_s: int = 24 * 3600
    auth_fail_limit: int = Field(
        default=20, description="wrong API keys answered 401 per client per window; valid keys always pass"
    )
    auth_fail_window_s: int = Field(
        default=60, description="opens at a client's first wrong key; past the limit, wrong keys get 429"
    )
    max_rejected_listed: int = 1000
    max_streams_per_key: int = Field(
        default=20, ge=1, description="live event streams one API key may hold open on one API process"
    )
    mlflow_tracking_uri: str = Field(
        default="", description="MLflow server every job logs to (a job's integrations may name another)"
    )
    mlflow_experiment: str = Field(default="spkd", description="MLflow experiment of jobs that name none")
    mlflow_allowed_uris: str = Field(
        default="",
        description="comma-separated MLflow servers (URL prefixes) a job's integrations may name "
        "besides SPKD_MLFLOW_TRACKING_URI; empty: that one only",
    )

    # Predictions with a job's shipped student inside the API (app/routes/predict.py, onnxruntime).
    predict_max_images: int = Field(
        default=16, ge=1, le=256, description="images one predict request may send"
    )
    predict_max_image_bytes: int = Field(
        default=10 * 1024**2, ge=1, description="largest image file of a predict request (413 past it)"
    )
    predict_cache_bytes: int = Field(
        default=512 * 1024**2,
        ge=0,
        description="loaded student models an API process keeps, counted by their ONNX file sizes (LRU)",
    )
    predict_concurrency: int = Field(
        default=2, ge=1, description="predict requests one API process works on at once; past it 429"
    )

    # Webhooks (app/routes/webhooks.py, workers/webhooks.py).
    webhooks_allow_private: bool = Field(
        default=False,
        description="let webhooks target private, loopback, link-local, reserved addresses (no SSRF guard)",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="per delivery attempt: connect + response"
    )
    webhook_max_attempts: int = Field(
        default=5, ge=1, le=20, description="attempts before a delivery gives up"
    )
    webhook_backoff_s: float = Field(
        default=10.0, ge=0, description="delay before the 2nd attempt; x3 per further attempt (+0-10% jitter)"
    )
    webhook_max_per_key: int = Field(default=20, ge=1, description="webhooks one API key may register")
    webhook_log_size: int = Field(default=100, ge=1, description="deliveries kept in each webhook's log")
    webhook_claim_idle_s: float = Field(
        default=60.0, gt=0, description="a sender's unfinished work older than this is taken over by another"
    )
    # Data lifecycle: retention and the sweep of leftovers. None keeps forever.
    job_ttl_days: float | None = Field(
        default=None,
        gt=0,
        description="jobs finished or paused longer ago than this are deleted (records and files)",
    )
    dataset_ttl_days: float | None = Field(
        default=None,
        gt=0,
        description="datasets older than this and unused by queued, running or paused jobs are deleted",
    )
    orphan_grace_s: float = Field(
        default=900.0,
        ge=0,
        description="a temporary or an unrecorded dataset/job folder untouched this long is removed",
    )
    sweep_interval_s: float = Field(
        default=600.0, gt=0, description="how often a worker sweeps leftovers and applies retention"
    )

    # Object storage (core/blobs.py). Empty storage_url: API and workers share data/artifact roots.
    storage_url: str = Field(
        default="", description="s3://bucket/prefix: datasets, checkpoints, artifacts in object storage"
    )
    s3_endpoint_url: str = Field(
        default="", description="S3-compatible endpoint; empty: AWS (AWS_ENDPOINT_URL)"
    )
    s3_public_endpoint_url: str = Field(
        default="", description="endpoint presigned download URLs name, when clients reach another one"
    )
    s3_region: str = Field(default="", description="empty: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1")
    s3_access_key_id: str = Field(default="", description="empty: the AWS_* variables / credential chain")
    s3_secret_access_key: SecretStr = Field(default=SecretStr(""), description="never logged or shown")
    s3_presign_ttl_s: int = Field(default=300, ge=1, le=7 * 24 * 3600, description="presigned URL lifetime")
    s3_download: Literal["redirect", "stream"] = Field(
        default="redirect", description="artifact downloads: 307 to a presigned URL, or streamed by the API"
    )
    s3_retries: int = Field(
        default=5, ge=1, description="attempts of one storage call before storage_unavailable"
    )
    s3_backoff_s: float = Field(
        default=1.0, ge=0, description="wait before the 2nd attempt; x2 per further one"
    )
    s3_timeout_s: float = Field(
        default=20.0, gt=0, description="connect and read timeout of one storage call"
    )
    dataset_cache_root: Path = Field(
        default=Path(".spkd/cache/datasets"), description="a worker's local copies of bucket datasets"
    )
    dataset_cache_bytes: int = Field(
        default=100 * 1024**3,
        ge=0,
        description="the dataset cache is trimmed to this (least recently used first)",
    )

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def weights_root_list(self) -> list[Path]:
        return [Path(p.strip()) for p in self.weights_roots.split(",") if p.strip()]

    def mlflow_allowed_uri_list(self) -> list[str]:
        """The MLflow servers a job may name: SPKD_MLFLOW_TRACKING_URI, then SPKD_MLFLOW_ALLOWED_URIS."""
        listed = [u.strip() for u in self.mlflow_allowed_uris.split(",") if u.strip()]
        return [u for u in [self.mlflow_tracking_uri.strip(), *listed] if u]


@lru_cache
def get_settings() -> Settings:
    return Settings()
