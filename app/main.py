"""The FastAPI app: v1 REST API over the Redis job store (DESIGN.md section 3). Never imports torch.

`create_app(settings)` builds an app; `app` (module level) is what `uvicorn app.main:app` serves.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import redis
import redis.asyncio as aredis
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import catalog, datasets, jsonsafe, store
from app.auth import AuthLimiter, KeyRing, request_owner
from app.errors import ApiError, install_error_handlers, not_found
from app.metrics import Metrics, MetricsMiddleware
from app.queue import enqueue, make_celery, revoke
from app.schemas import (
    ArtifactList,
    Dataset,
    DatasetList,
    ErrorResponse,
    EventList,
    Health,
    Job,
    JobList,
    ModelInfo,
    ModelList,
    Ready,
    Status,
    WeightFile,
)
from app.settings import Settings, get_settings
from models.spec import EXAMPLE_SPEC, JobSpec

log = logging.getLogger("spkd.api")

Owner = Annotated[str, Depends(request_owner)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse} for c in (401, 429, 503, *codes)}


def _ctx(request: Request) -> tuple[redis.Redis, store.Keys, Settings]:
    st = request.app.state
    return st.redis, st.keys, st.settings


# ---------------------------------------------------------------- job validation at POST


def _check_models(spec: JobSpec, settings: Settings) -> None:
    for role in ("teacher", "student"):
        part = getattr(spec, role)
        known, close = catalog.check_model_name(part.model)
        if not known:
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ApiError(
                422,
                "unknown_model",
                f"timm has no model {part.model!r}{hint}",
                f"{role}.model",
                suggestions=close,
            )
        base = part.model.partition(".")[0]
        if part.weights == "package" and base not in catalog.PACKAGE_WEIGHTS:
            raise ApiError(
                422,
                "weights_unavailable",
                f"'package' weights exist only for {', '.join(sorted(catalog.PACKAGE_WEIGHTS))}",
                f"{role}.weights",
            )
        if part.weights == "hub" and "hub" not in catalog.weights_available(base, settings.hub_weights):
            why = (
                "this server has no internet access"
                if not settings.hub_weights
                else "timm has no pretrained weights"
            )
            raise ApiError(422, "weights_unavailable", f"'hub' weights for {base}: {why}", f"{role}.weights")


def _check_weight_refs(
    r: redis.Redis, keys: store.Keys, spec: JobSpec, owner: str, settings: Settings
) -> None:
    roots = [Path(p).resolve() for p in settings.allowed_weight_roots()]
    for role in ("teacher", "student"):
        w = getattr(spec, role).weights
        if w.startswith("job:"):
            if store.get_job(r, keys, w[4:], owner) is None:
                raise ApiError(
                    422, "weights_job_not_found", f"no job {w[4:]!r} for this API key", f"{role}.weights"
                )
        elif w not in ("hub", "none", "package"):
            p = Path(w)
            candidates = (
                []
                if "\x00" in w
                else [p.resolve()]
                if p.is_absolute()
                else [(root / p).resolve() for root in roots]
            )
            if not any(c.is_file() and any(c.is_relative_to(root) for root in roots) for c in candidates):
                raise ApiError(
                    422,
                    "weights_not_allowed",
                    f"weight file {w!r} is not a file under the server's weight folders (SPKD_WEIGHTS_ROOTS)",
                    f"{role}.weights",
                )


def _check_dataset(r: redis.Redis, keys: store.Keys, spec: JobSpec, owner: str, settings: Settings) -> None:
    ds = spec.dataset
    if ds.id is not None:
        if store.get_dataset(r, keys, ds.id, owner) is None:
            raise ApiError(422, "dataset_not_found", f"no dataset {ds.id!r} for this API key", "dataset.id")
        return
    path = datasets.resolve_data_path(settings, ds.path or "")
    if path is None:
        raise ApiError(
            422,
            "dataset_path_not_allowed",
            "dataset.path must stay inside the server's data root",
            "dataset.path",
        )
    if not path.is_dir():
        raise ApiError(
            422, "dataset_not_found", f"no folder {ds.path!r} under the server's data root", "dataset.path"
        )


# ---------------------------------------------------------------- routes: jobs


jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SPEC_EXAMPLES = {
    "distil lite2 -> lite0": {"summary": "the paper's transfer setting", "value": EXAMPLE_SPEC},
    "tiny CPU smoke test": {
        "summary": "tiny random-init models, 1 epoch",
        "value": {
            "teacher": {"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": 1}},
            "student": {"model": "test_resnet", "weights": "none"},
            "dataset": {"id": "ds_01jdx3k4m9a8b7c6d5e4"},
            "train": {"epochs": 1, "batch_size": 8, "image_size": 64},
            "baseline": False,
        },
    },
}


@jobs.post(
    "",
    status_code=201,
    response_model=Job,
    responses=_errors(400, 409, 422),
    summary="Create a job",
    description="Validates the spec (model names, weights, dataset) and queues the job. Send an "
    "`Idempotency-Key` header to make retries safe: the same key and body return the same job (200), "
    "the same key with another body is a 409.",
)
def create_job(
    request: Request,
    response: Response,
    owner: Owner,
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Job:
    r, keys, settings = _ctx(request)
    _check_models(spec, settings)
    _check_dataset(r, keys, spec, owner, settings)
    _check_weight_refs(r, keys, spec, owner, settings)
    body = spec.model_dump(mode="json")
    job_id = store.new_id("job")
    if idempotency_key:
        earlier = store.claim_idempotency_key(
            r, keys, owner, idempotency_key, store.body_hash(body), job_id, settings.idempotency_ttl_s
        )
        if earlier is not None:
            return _replay(r, keys, owner, earlier, store.body_hash(body), response)
    job = store.create_job(r, keys, owner, body, job_id)
    try:
        enqueue(request.app.state.celery, settings, job_id)
    except Exception as e:  # noqa: BLE001 - broker down: do not leave a job queued forever
        log.warning("enqueue failed for %s: %s", job_id, e)
        store.transition(
            r,
            keys,
            job_id,
            store.FAILED,
            [store.QUEUED],
            "could not be queued",
            error={"code": "enqueue_failed", "message": "the queue was unreachable", "field": None},
        )
        raise ApiError(
            503, "queue_unavailable", "the job queue is unreachable; retry", headers={"Retry-After": "5"}
        ) from e
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return Job.from_store(job)


def _replay(
    r: redis.Redis, keys: store.Keys, owner: str, earlier: dict[str, str], body_sha: str, response: Response
) -> Job:
    if earlier["body"] != body_sha:
        raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key was used with a different body")
    job = store.get_job(r, keys, earlier["job_id"], owner)
    if job is None:  # the first request is still between claiming the key and writing the job
        raise ApiError(
            409,
            "idempotency_in_progress",
            "a request with this Idempotency-Key is in progress; retry",
            headers={"Retry-After": "1"},
        )
    response.status_code = 200
    response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return Job.from_store(job)


@jobs.get("", response_model=JobList, responses=_errors(422), summary="List jobs, newest first")
def list_jobs(
    request: Request,
    owner: Owner,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=80, description="next_cursor of the previous page")] = None,
) -> JobList:
    r, keys, _ = _ctx(request)
    items, cursor = store.list_jobs(r, keys, owner, status, limit, after)
    return JobList(data=[Job.from_store(j) for j in items], has_more=cursor is not None, next_cursor=cursor)


def _own_job(request: Request, owner: str, job_id: str) -> dict[str, Any]:
    r, keys, _ = _ctx(request)
    job = store.get_job(r, keys, job_id, owner)
    if job is None:
        raise not_found("job", job_id)
    return job


@jobs.get("/{job_id}", response_model=Job, responses=_errors(404), summary="Retrieve a job")
def get_job(request: Request, owner: Owner, job_id: str) -> Job:
    return Job.from_store(_own_job(request, owner, job_id))


@jobs.post(
    "/{job_id}/cancel",
    response_model=Job,
    responses=_errors(404, 409),
    summary="Cancel a job",
    description="A queued job is cancelled at once and never starts. A validating or running job gets a "
    "flag the engine checks every training step; it ends `cancelled` and frees the GPU. Cancelling a "
    "cancelled job is a no-op; a finished job is a 409.",
)
def cancel_job(request: Request, owner: Owner, job_id: str) -> Job:
    r, keys, _ = _ctx(request)
    before = _own_job(request, owner, job_id)
    try:
        job = store.request_cancel(r, keys, job_id)
    except store.Conflict as e:
        raise ApiError(409, "job_finished", str(e)) from e
    if before["status"] == store.QUEUED and job["status"] == store.CANCELLED:
        revoke(request.app.state.celery, job_id)
    return Job.from_store(job)


@jobs.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={**_errors(404), 200: {"content": {"text/event-stream": {}}, "description": "JSON or SSE"}},
    summary="Event log (JSON, or a server-sent-event stream)",
    description="JSON by default. With `Accept: text/event-stream` (or `?stream=true`) a live SSE stream: "
    "one `event: <kind>` per log entry with `id:` (resume with `Last-Event-ID`), `event: progress` "
    "whenever step progress changes, and a final `event: end` once the job is finished.",
)
async def job_events(
    request: Request,
    owner: Owner,
    job_id: str,
    after: Annotated[str | None, Query(max_length=40, pattern=r"^\d+-\d+$")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header(max_length=40, pattern=r"^\d+-\d+$")] = None,
) -> Any:
    r, keys, _ = _ctx(request)
    job = await anyio.to_thread.run_sync(_own_job, request, owner, job_id)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        start = last_event_id or after or "0-0"
        return StreamingResponse(
            _sse(request, keys, job_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events = await anyio.to_thread.run_sync(lambda: store.list_events(r, keys, job_id, after, limit))
    cursor = events[-1]["id"] if events else after
    return EventList(data=events, status=job["status"], next_cursor=cursor)


def _sse_frame(event: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {jsonsafe.dumps(data, default=str)}\n\n"


async def _sse(request: Request, keys: store.Keys, job_id: str, last: str) -> AsyncIterator[str]:
    ar: aredis.Redis = request.app.state.aredis
    last_progress: str | None = None
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        status, progress = await store.aget_job_fields(ar, keys, job_id, "status", "progress")
        # Status first, events second: a final status is written together with its event,
        # so reading events after seeing it never misses the last one.
        events = await store.aread_events(
            ar, keys, job_id, last, block_ms=0 if status in store.FINAL else 1000
        )
        for e in events:
            yield _sse_frame(e["kind"], e, e["id"])
            last = e["id"]
        if progress and progress != last_progress:
            last_progress = progress
            yield _sse_frame("progress", json.loads(progress))
        if status in store.FINAL and not events:
            yield _sse_frame("end", {"status": status})
            return
        if events or progress:
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > 15:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"


@jobs.get(
    "/{job_id}/artifacts", response_model=ArtifactList, responses=_errors(404), summary="List artifacts"
)
def list_artifacts(request: Request, owner: Owner, job_id: str) -> ArtifactList:
    r, keys, _ = _ctx(request)
    _own_job(request, owner, job_id)
    return ArtifactList(data=store.list_artifacts(r, keys, job_id))


@jobs.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={**_errors(404), 200: {"content": {"application/octet-stream": {}}}},
    summary="Download an artifact (streamed)",
)
def download_artifact(request: Request, owner: Owner, job_id: str, name: str) -> FileResponse:
    r, keys, settings = _ctx(request)
    _own_job(request, owner, job_id)
    meta = store.get_artifact(r, keys, job_id, name)  # only registered names: no path tricks
    path = Path(settings.artifact_root).resolve() / job_id / name
    if meta is None or not path.is_file():
        raise not_found("artifact", name)
    return FileResponse(
        path,
        filename=name,
        media_type="application/octet-stream",
        headers={"ETag": f'"{meta["sha256"]}"', "X-Checksum-Sha256": meta["sha256"]},
    )


# ---------------------------------------------------------------- routes: datasets


dsets = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@dsets.post(
    "",
    status_code=201,
    response_model=Dataset,
    responses=_errors(400, 413, 422),
    summary="Upload a dataset (zip of an ImageFolder)",
    description="`multipart/form-data` with the zip in a `file` part (and an optional `name` field), or "
    "the zip as the raw body (`Content-Type: application/zip`, name in `?name=`). Layouts: `class/x.jpg` "
    "or `train/class/x.jpg` + `val/class/x.jpg`. Unreadable files are skipped and listed with a reason.",
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string"},
                        },
                        "required": ["file"],
                    }
                },
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    },
)
async def upload_dataset(
    request: Request, owner: Owner, name: Annotated[str | None, Query(max_length=200)] = None
) -> Dataset:
    r, keys, settings = _ctx(request)
    root = datasets.datasets_dir(settings)
    ds_id = store.new_id("ds")
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=root) as tmp:
        zip_path = Path(tmp) / "upload.zip"
        fields = await datasets.receive_upload(
            request.stream(),
            request.headers.get("content-type", ""),
            request.headers.get("content-length"),
            zip_path,
            settings.max_upload_bytes,
        )
        res = await anyio.to_thread.run_sync(datasets.extract_dataset, zip_path, root / ds_id, settings)
    label = (fields.get("name") or name or ds_id)[:200]
    record = datasets.dataset_record(ds_id, owner, label, res, settings)
    await anyio.to_thread.run_sync(store.save_dataset, r, keys, record)
    return Dataset.from_store(record)


@dsets.get("", response_model=DatasetList, summary="List datasets, newest first", responses=_errors())
def list_datasets(
    request: Request,
    owner: Owner,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    after: Annotated[str | None, Query(max_length=80)] = None,
) -> DatasetList:
    r, keys, _ = _ctx(request)
    items, cursor = store.list_datasets(r, keys, owner, limit, after)
    return DatasetList(
        data=[Dataset.from_store(d) for d in items], has_more=cursor is not None, next_cursor=cursor
    )


@dsets.get("/{ds_id}", response_model=Dataset, responses=_errors(404), summary="Describe a dataset")
def get_dataset(request: Request, owner: Owner, ds_id: str) -> Dataset:
    r, keys, _ = _ctx(request)
    ds = store.get_dataset(r, keys, ds_id, owner)
    if ds is None:
        raise not_found("dataset", ds_id)
    return Dataset.from_store(ds)


# ---------------------------------------------------------------- routes: models, health, metrics


misc = APIRouter()


@misc.get(
    "/v1/models",
    response_model=ModelList,
    tags=["models"],
    responses=_errors(),
    summary="Models the server can build, with the weights available for each",
)
def list_models(
    request: Request,
    owner: Owner,
    q: Annotated[str | None, Query(max_length=100, description="substring filter")] = None,
    pretrained: Annotated[bool | None, Query(description="only models with hub weights")] = None,
) -> ModelList:
    settings: Settings = request.app.state.settings
    out = []
    for name, tags in catalog.timm_models().items():
        if (q and q.lower() not in name.lower()) or (pretrained and not tags):
            continue
        out.append(
            ModelInfo(
                name=name,
                pretrained_tags=list(tags),
                weights=catalog.weights_available(name, settings.hub_weights),
            )
        )
    files = [WeightFile(**f) for f in catalog.weight_files(settings.weights_root_list())]
    return ModelList(total=len(out), data=out, weight_files=files)


@misc.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness (no auth)")
def healthz() -> Health:
    return Health()


@misc.get(
    "/readyz",
    response_model=Ready,
    tags=["ops"],
    summary="Readiness: Redis and at least one worker",
    responses={503: {"model": Ready}},
)
def readyz(request: Request) -> Any:
    r, keys, settings = _ctx(request)
    try:
        r.ping()
        live = [
            w
            for w in store.live_workers(r, keys, settings.heartbeat_ttl_s)
            if w.get("queue") == settings.queue
        ]
    except redis.exceptions.RedisError as e:
        body = Ready(status="not_ready", redis=False, workers=0, detail=f"redis: {e}")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    if not live:
        body = Ready(
            status="not_ready", redis=True, workers=0, detail=f"no live worker on queue {settings.queue!r}"
        )
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    return Ready(status="ready", redis=True, workers=len(live))


@misc.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}}},
    response_class=Response,
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------- the app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    keys = store.Keys(settings.redis_prefix)
    r = store.connect(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # XREAD BLOCK for SSE on an async client, bound to the server's event loop.
        app.state.aredis = aredis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
        )
        yield
        await app.state.aredis.aclose()

    app = FastAPI(
        title="spkd",
        version="1.0.0",
        summary="Distil a large ImageNet teacher into a small student with Similarity-Preserving KD",
        lifespan=lifespan,
    )
    app.state.settings, app.state.keys, app.state.redis = settings, keys, r
    app.state.keyring = KeyRing(settings)
    app.state.auth_limiter = AuthLimiter(r, keys, settings)
    app.state.celery = make_celery(settings)
    app.state.metrics = Metrics(lambda: store.count_by_status(r, keys))
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    for router in (jobs, dsets, misc):
        app.include_router(router)
    _mount_dashboard(app)
    return app


def _mount_dashboard(app: FastAPI) -> None:
    try:
        from app import dashboard
    except ImportError:  # the dashboard is optional for the API
        return
    app.include_router(dashboard.router)


app = create_app()
