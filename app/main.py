"""The FastAPI app: v1 REST API over the Redis job store (README, The REST API). Never imports torch.

`create_app(settings)` builds an app; `app` (module level) is what `uvicorn app.main:app` serves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import redis
import redis.asyncio as aredis
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask

from app import catalog, datasets, downloads, validation, webhooks
from app.auth import AuthLimiter, KeyRing, request_owner
from app.errors import ApiError, install_error_handlers, not_found
from app.metrics import HISTOGRAMS, Metrics, MetricsMiddleware, StoreSnapshot
from app.schemas import (
    ArtifactList,
    Dataset,
    DatasetList,
    ErrorResponse,
    Event,
    EventList,
    Health,
    Job,
    JobList,
    ModelInfo,
    ModelList,
    ProgressOut,
    Ready,
    Status,
    WeightFile,
)
from core import jsonsafe, references, storage, store
from core.queue import enqueue, make_celery, queue_depth, revoke
from core.settings import Settings, get_settings
from models.errors import SpkdError
from models.spec import EXAMPLE_SPEC, JobSpec

log = logging.getLogger("spkd.api")

Owner = Annotated[str, Depends(request_owner)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse} for c in (401, 429, 503, *codes)}


def _ctx(request: Request) -> tuple[redis.Redis, store.Keys, Settings]:
    st = request.app.state
    return st.redis, st.keys, st.settings


# ---------------------------------------------------------------- ids and cursors

# 19 digits always fit the 64-bit halves of a Redis stream id (20 may not: 500 from XRANGE).
STREAM_ID = r"^[0-9]{1,19}-[0-9]{1,19}$"
JOB_ID = r"^job_[A-Za-z0-9_-]{1,64}$"
DATASET_ID = r"^ds_[A-Za-z0-9_-]{1,64}$"
# A file name, or up to 8 folder levels of them (tensorboard/<stage>/steps/events...); no segment
# starts with a dot, so `..` never is one.
_ARTIFACT_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}"
ARTIFACT_NAME = re.compile(rf"^(?:{_ARTIFACT_SEGMENT}/){{0,7}}{_ARTIFACT_SEGMENT}$")


def _cursor(value: str | None, pattern: str, field: str, what: str) -> str | None:
    """A cursor as sent, or 400 `invalid_cursor` naming the field (never a Redis error later)."""
    if value is not None and not re.fullmatch(pattern, value):
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise ApiError(400, "invalid_cursor", f"{field} {shown!r} is not {what}", field)
    return value


def _documented(pattern: str, description: str) -> dict[str, Any]:
    # In the OpenAPI document, checked by _cursor (a 400 invalid_cursor, not FastAPI's 422).
    return {"json_schema_extra": {"pattern": pattern}, "description": description}


def _links(**links: tuple[str, dict[str, str]]) -> dict[str, Any]:
    """OpenAPI links (name -> (operationId, parameters)): how a response's ids and cursors feed the
    next request, for clients and for schemathesis' stateful phase."""
    return {
        "links": {name: {"operationId": op, "parameters": params} for name, (op, params) in links.items()}
    }


_JOB_OPS = {
    "GetJob": "get_job_v1_jobs__job_id__get",
    "JobEvents": "job_events_v1_jobs__job_id__events_get",
    "JobArtifacts": "list_artifacts_v1_jobs__job_id__artifacts_get",
    "CancelJob": "cancel_job_v1_jobs__job_id__cancel_post",
}


def _job_links(id_expr: str) -> dict[str, Any]:
    return _links(**{name: (op, {"job_id": id_expr}) for name, op in _JOB_OPS.items()})


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


def _check_references(
    r: redis.Redis, keys: store.Keys, spec: JobSpec, owner: str, settings: Settings
) -> None:
    """Every file the spec names, decided by core.references (the worker decides again at run
    time); a `job:` reference to one of the caller's still active jobs is accepted here."""
    try:
        references.resolve_spec(r, keys, settings, spec, owner, require_finished=False)
    except SpkdError as e:
        status = 409 if e.code == "dataset_not_ready" else 422  # retry later vs fix the spec
        raise ApiError(status, e.code, e.message, e.field) from e


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
    responses={**_errors(400, 409, 422), 201: _job_links("$response.body#/id")},
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
    _check_references(r, keys, spec, owner, settings)
    body = spec.model_dump(mode="json")
    job_id = store.new_id("job")
    if idempotency_key:
        earlier = store.claim_idempotency_key(
            r, keys, owner, idempotency_key, store.body_hash(body), job_id, settings.idempotency_ttl_s
        )
        if earlier is not None:
            return _replay(r, keys, owner, earlier, store.body_hash(body), response)
    job = store.create_job(r, keys, owner, body, job_id)
    _enqueue_or_fail(request, job_id)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return Job.from_store(job)


def _enqueue_or_fail(request: Request, job_id: str) -> None:
    """Send the job to the workers; when the broker is down, fail the job (never queued forever)
    and answer 503."""
    r, keys, settings = _ctx(request)
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


_LIST_JOB_LINKS = _job_links("$response.body#/data/0/id")["links"]
_LIST_JOB_LINKS["NextPage"] = {
    "operationId": "list_jobs_v1_jobs_get",
    "parameters": {"after": "$response.body#/next_cursor"},
}


@jobs.get(
    "",
    response_model=JobList,
    responses={**_errors(400, 422), 200: {"links": _LIST_JOB_LINKS}},
    summary="List jobs, newest first",
)
def list_jobs(
    request: Request,
    owner: Owner,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(**_documented(JOB_ID, "next_cursor of the previous page"))] = None,
    name: Annotated[str | None, Query(max_length=200, description="only jobs with this name")] = None,
    metadata: Annotated[
        list[str] | None,
        Query(max_length=600, description="key:value; only jobs whose metadata has it (repeat: all must)"),
    ] = None,
) -> JobList:
    r, keys, _ = _ctx(request)
    after = _cursor(after, JOB_ID, "after", "a job id (the next_cursor of a previous page)")
    match = _job_filter(name, metadata or [])
    items, cursor = store.list_jobs(r, keys, owner, status, limit, after, match=match)
    return JobList(data=[Job.from_store(j) for j in items], has_more=cursor is not None, next_cursor=cursor)


def _job_filter(name: str | None, metadata: list[str]) -> Callable[[dict[str, Any]], bool] | None:
    """The list filter for ?name= and ?metadata=key:value (None: no filter). 400 on a bad pair."""
    pairs = []
    for item in metadata:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise ApiError(400, "invalid_filter", f"metadata filter {item!r} is not key:value", "metadata")
        pairs.append((key, value))
    if name is None and not pairs:
        return None

    def match(job: dict[str, Any]) -> bool:
        spec = job.get("spec") or {}
        meta = spec.get("metadata") or {}
        return (name is None or spec.get("name") == name) and all(meta.get(k) == v for k, v in pairs)

    return match


def _own_job(request: Request, owner: str, job_id: str) -> dict[str, Any]:
    r, keys, _ = _ctx(request)
    # A malformed id cannot exist: the same 404 as a missing one, without asking Redis.
    job = store.get_job(r, keys, job_id, owner) if re.fullmatch(JOB_ID, job_id) else None
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
    "flag the engine checks every training step; it ends `cancelled` and frees the GPU. A 200 always "
    "ends `cancelled` (a job past its last step drops its results). Cancelling a cancelled job is a "
    "no-op; a succeeded or failed job is a 409 with its `status`.",
)
def cancel_job(request: Request, owner: Owner, job_id: str) -> Job:
    r, keys, _ = _ctx(request)
    before = _own_job(request, owner, job_id)
    try:
        job = store.request_cancel(r, keys, job_id)
    except store.Conflict as e:
        current = _own_job(request, owner, job_id)["status"]
        err = ApiError(409, "job_finished", f"job {job_id} already {current}; nothing to cancel")
        err.extra["status"] = current  # `status` is also ApiError's HTTP status argument
        raise err from e
    if before["status"] == store.QUEUED and job["status"] == store.CANCELLED:
        revoke(request.app.state.celery, job_id)
    return Job.from_store(job)


@jobs.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses=_errors(404, 409),
    summary="Delete a job",
    description="Removes a finished job: its record, events, artifacts (files and index) and the "
    "Idempotency-Keys that name it; its id is unknown (404) afterwards. A queued or running job is a "
    "409 `job_active` with its `status`: cancel it first.",
)
def delete_job(request: Request, owner: Owner, job_id: str) -> Response:
    r, keys, settings = _ctx(request)
    try:
        job = storage.delete_job(r, keys, settings, job_id, owner)
    except store.Conflict as e:
        current = (store.get_job(r, keys, job_id) or {}).get("status")
        raise _conflict("job_active", str(e), current) from e
    if job is None:
        raise not_found("job", job_id)
    return Response(status_code=204)


def _conflict(code: str, message: str, status: str | None) -> ApiError:
    """A 409 whose body also carries the job's current `status` (ApiError's own `status` is HTTP's)."""
    err = ApiError(409, code, message)
    err.extra["status"] = status
    return err


@jobs.post(
    "/{job_id}/resume",
    response_model=Job,
    responses=_errors(404, 409),
    summary="Resume a failed or cancelled job from its checkpoint",
    description="Queues a new attempt of a `failed` or `cancelled` job that continues from its last "
    "epoch-end checkpoint (e.g. after freeing space for a `storage_full` failure). Any other status, or "
    "no checkpoint, is a 409 `job_not_resumable` with the job's `status`.",
)
def resume_job(request: Request, owner: Owner, job_id: str) -> Job:
    r, keys, settings = _ctx(request)
    job = _own_job(request, owner, job_id)

    def refuse(why: str) -> ApiError:
        return _conflict("job_not_resumable", f"job {job_id} is {job['status']}: {why}", job["status"])

    if job["status"] not in (store.FAILED, store.CANCELLED):
        raise refuse("only a failed or cancelled job can be resumed")
    if not storage.has_checkpoint(settings, job_id):
        raise refuse("it has no checkpoint to resume from (it stopped before its first epoch ended)")
    if store.lease_held(r, keys, job_id):
        raise refuse("its last run is still shutting down; retry in a few seconds")
    try:
        job = store.resume_job(r, keys, job_id)
    except store.Conflict as e:  # resumed or changed by a concurrent request
        job = store.get_job(r, keys, job_id) or job
        raise refuse(str(e)) from e
    _enqueue_or_fail(request, job_id)
    return Job.from_store(job)


@jobs.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        **_errors(400, 404),
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON or SSE",
            **_links(
                NextEvents=(
                    _JOB_OPS["JobEvents"],
                    {"job_id": "$request.path.job_id", "after": "$response.body#/next_cursor"},
                )
            ),
        },
    },
    summary="Event log (JSON, or a server-sent-event stream)",
    description="JSON by default. With `Accept: text/event-stream` (or `?stream=true`) a live SSE stream: "
    "one `event: <kind>` per log entry with `id:` (resume with `Last-Event-ID`), `event: progress` "
    "whenever step progress changes, and a final `event: end` once the job is finished.",
)
async def job_events(
    request: Request,
    owner: Owner,
    job_id: str,
    after: Annotated[str | None, Query(**_documented(STREAM_ID, "id of the last event seen"))] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    stream: bool = False,
    last_event_id: Annotated[
        str | None, Header(**_documented(STREAM_ID, "SSE resume: id of the last event seen"))
    ] = None,
) -> Any:
    r, keys, _ = _ctx(request)
    after = _cursor(after, STREAM_ID, "after", "an event id (<ms>-<seq>, as in the event log)")
    last_event_id = _cursor(last_event_id, STREAM_ID, "Last-Event-ID", "an event id (<ms>-<seq>)")
    job = await anyio.to_thread.run_sync(_own_job, request, owner, job_id)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        start = last_event_id or after or "0-0"
        return StreamingResponse(
            _sse(request, keys, job_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events = await anyio.to_thread.run_sync(lambda: store.list_events(r, keys, job_id, after, limit + 1))
    page, has_more = events[:limit], len(events) > limit
    cursor = page[-1]["id"] if page else after
    return EventList(
        data=[Event.from_store(e) for e in page], status=job["status"], has_more=has_more, next_cursor=cursor
    )


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
            yield _sse_frame(e["kind"], Event.from_store(e).model_dump(mode="json"), e["id"])
            last = e["id"]
        if progress and progress != last_progress:
            last_progress = progress
            body = ProgressOut.model_validate(json.loads(progress)).model_dump(mode="json")
            yield _sse_frame("progress", body)
        if status in store.FINAL and not events:
            yield _sse_frame("end", {"status": status})
            return
        if events or progress:
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > 15:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"


@jobs.get(
    "/{job_id}/artifacts",
    response_model=ArtifactList,
    responses={
        **_errors(404),
        200: _links(
            Download=(
                "download_artifact_v1_jobs__job_id__artifacts__name__get",
                {"job_id": "$request.path.job_id", "name": "$response.body#/data/0/name"},
            )
        ),
    },
    summary="List artifacts",
)
def list_artifacts(request: Request, owner: Owner, job_id: str) -> ArtifactList:
    r, keys, _ = _ctx(request)
    _own_job(request, owner, job_id)
    return ArtifactList(data=store.list_artifacts(r, keys, job_id))


@jobs.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        **_errors(404, 503),
        200: {"content": {"application/octet-stream": {}}},
        307: {"description": "with SPKD_STORAGE_URL: a presigned URL of the object"},
    },
    summary="Download an artifact (streamed, or redirected to object storage)",
)
def download_artifact(
    request: Request,
    owner: Owner,
    job_id: str,
    name: str,
    format: Annotated[
        Literal["zip"] | None,
        Query(description="zip: a model folder (student, teacher, baseline, distilled) as one archive"),
    ] = None,
) -> Response:
    r, keys, settings = _ctx(request)
    _own_job(request, owner, job_id)
    if format == "zip":
        return _folder_zip(r, keys, settings, job_id, name)
    # Only registered names: no path tricks; a malformed name is not one (404 without Redis).
    meta = store.get_artifact(r, keys, job_id, name) if ARTIFACT_NAME.fullmatch(name) else None
    if meta is None:
        raise not_found("artifact", name)
    return downloads.artifact_response(settings, job_id, name, meta)


def _folder_zip(r: redis.Redis, keys: store.Keys, settings: Settings, job_id: str, name: str) -> FileResponse:
    """The registered artifacts under `name/` as one zip (`name/...` inside), built in a temporary
    file that is removed once sent. 404 when no registered artifact is under that folder."""
    prefix = name.rstrip("/") + "/"
    members = [a["name"] for a in store.list_artifacts(r, keys, job_id) if a["name"].startswith(prefix)]
    if not ARTIFACT_NAME.fullmatch(name.rstrip("/")) or not members:
        raise not_found("artifact", name)
    tmp = tempfile.NamedTemporaryFile(prefix=".spkd-zip-", suffix=".zip", delete=False)  # noqa: SIM115
    with (
        tmp,
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf,  # weights do not compress
        tempfile.TemporaryDirectory(prefix=".spkd-zip-") as fetched,
    ):
        for member in members:
            zf.write(downloads.member_file(settings, job_id, member, Path(fetched)), member)
    return FileResponse(
        tmp.name,
        filename=f"{Path(prefix).name}.zip",
        media_type="application/zip",
        background=BackgroundTask(os.unlink, tmp.name),
    )


# ---------------------------------------------------------------- routes: datasets


dsets = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@dsets.post(
    "",
    status_code=201,
    response_model=Dataset,
    responses={
        **_errors(400, 413, 422, 507),
        201: _links(GetDataset=("get_dataset_v1_datasets__ds_id__get", {"ds_id": "$response.body#/id"})),
        202: {"model": Dataset, "description": "large upload stored; validating in the background"},
    },
    summary="Upload a dataset (zip of an ImageFolder)",
    description="`multipart/form-data` with the zip in a `file` part (and an optional `name` field), or "
    "the zip as the raw body (`Content-Type: application/zip`, name in `?name=`). Layouts: `class/x.jpg`, "
    "or `train/class/x.jpg` with `val/` and/or `test/` beside it, inside any wrapping folder (README, "
    "Datasets). The zip is scanned by the engine's own scanner: files left out are listed with a reason. "
    "A zip larger than SPKD_UPLOAD_SYNC_MAX_BYTES answers 202 with `status: validating` and a Location; "
    "poll it until `ready` or `failed` (`error: {code, message}`).",
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
    request: Request,
    response: Response,
    owner: Owner,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Dataset:
    r, keys, settings = _ctx(request)
    root = references.datasets_dir(settings)
    ds_id = store.new_id("ds")
    try:
        with tempfile.TemporaryDirectory(prefix=".upload-", dir=root) as tmp:
            zip_path = Path(tmp) / "upload.zip"
            fields = await datasets.receive_upload(
                request.stream(),
                request.headers.get("content-type", ""),
                request.headers.get("content-length"),
                zip_path,
                settings.max_upload_bytes,
            )
            label = (fields.get("name") or name or ds_id)[:200]
            if zip_path.stat().st_size > settings.upload_sync_max_bytes:  # scanned in the background
                accept = request.app.state.validator.accept
                record = await anyio.to_thread.run_sync(accept, zip_path, ds_id, owner, label)
                response.status_code, response.headers["Location"] = 202, f"/v1/datasets/{ds_id}"
                return Dataset.from_store(record)
            res = await anyio.to_thread.run_sync(datasets.extract_dataset, zip_path, root / ds_id, settings)
    except OSError as e:
        if storage.storage_full(e) is None:
            raise
        raise _storage_full("the dataset storage (SPKD_DATA_ROOT)") from e
    record = datasets.dataset_record(ds_id, owner, label, res, settings)
    try:
        await anyio.to_thread.run_sync(store.save_dataset, r, keys, record)
    except BaseException:
        # No record, no folder: an extracted dataset the API cannot see would only fill the disk.
        await anyio.to_thread.run_sync(storage.remove_tree, root / ds_id)
        raise
    return Dataset.from_store(record)


def _storage_full(where: str) -> ApiError:
    return ApiError(
        507,
        "storage_full",
        f"{where} is full; nothing was kept. Free space on the server (or delete old datasets "
        "and jobs), then retry",
        "file",
    )


@dsets.get(
    "",
    response_model=DatasetList,
    summary="List datasets, newest first",
    responses={
        **_errors(400, 422),
        200: _links(
            NextPage=("list_datasets_v1_datasets_get", {"after": "$response.body#/next_cursor"}),
            GetDataset=("get_dataset_v1_datasets__ds_id__get", {"ds_id": "$response.body#/data/0/id"}),
        ),
    },
)
def list_datasets(
    request: Request,
    owner: Owner,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    after: Annotated[str | None, Query(**_documented(DATASET_ID, "next_cursor of the previous page"))] = None,
) -> DatasetList:
    r, keys, _ = _ctx(request)
    after = _cursor(after, DATASET_ID, "after", "a dataset id (the next_cursor of a previous page)")
    items, cursor = store.list_datasets(r, keys, owner, limit, after)
    return DatasetList(
        data=[Dataset.from_store(d) for d in items], has_more=cursor is not None, next_cursor=cursor
    )


@dsets.get("/{ds_id}", response_model=Dataset, responses=_errors(404), summary="Describe a dataset")
def get_dataset(request: Request, owner: Owner, ds_id: str) -> Dataset:
    r, keys, _ = _ctx(request)
    ds = store.get_dataset(r, keys, ds_id, owner) if re.fullmatch(DATASET_ID, ds_id) else None
    if ds is None:
        raise not_found("dataset", ds_id)
    return Dataset.from_store(ds)


@dsets.delete(
    "/{ds_id}",
    status_code=204,
    response_class=Response,
    responses=_errors(404, 409),
    summary="Delete a dataset",
    description="Removes the dataset's record and files. Refused (409 `dataset_in_use`, with the job "
    "ids) while a queued or running job uses it: cancel those first. Finished jobs keep their results.",
)
def delete_dataset(request: Request, owner: Owner, ds_id: str) -> Response:
    r, keys, settings = _ctx(request)
    try:
        ds = storage.delete_dataset(r, keys, settings, ds_id, owner)
    except store.Conflict as e:
        users = store.jobs_using_dataset(r, keys, owner, ds_id)
        raise ApiError(409, "dataset_in_use", str(e), jobs=users) from e
    if ds is None:
        raise not_found("dataset", ds_id)
    return Response(status_code=204)


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
    files = [
        WeightFile(**f)
        for f in catalog.weight_files(settings.weights_root_list())
        if references.is_public_weight_file(settings, Path(str(f["path"])))
    ]
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
        await anyio.to_thread.run_sync(_sweep_at_start, r, keys, settings)
        app.state.validator = validation.Validator(r, keys, settings)
        app.state.validator.start()  # picks up validations a previous process left unfinished
        yield
        app.state.validator.close()
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
    app.state.metrics = Metrics(
        lambda: StoreSnapshot(
            jobs_by_status=store.count_by_status(r, keys),
            queue_depth=queue_depth(r, settings),
            live_workers=len(store.live_workers(r, keys, settings.heartbeat_ttl_s)),
            histograms={h[1]: store.read_histogram(r, keys, h[1]) for h in HISTOGRAMS},
        )
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    for router in (jobs, dsets, misc):
        app.include_router(router)
    app.include_router(webhooks.router)
    _mount_dashboard(app)
    return app


def _sweep_at_start(r: redis.Redis, keys: store.Keys, settings: Settings) -> None:
    """Leftovers of a killed API (upload temporaries, unrecorded folders): best effort, the API
    starts even when Redis or the volumes misbehave."""
    try:
        storage.sweep(r, keys, settings)
    except Exception:  # noqa: BLE001
        log.exception("sweep of leftovers at start failed")


def _mount_dashboard(app: FastAPI) -> None:
    try:
        from app import dashboard
    except ImportError:  # the dashboard is optional for the API
        return
    app.include_router(dashboard.router)


app = create_app()
