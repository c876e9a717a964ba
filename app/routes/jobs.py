"""Job routes: create (with idempotency keys), list, retrieve, cancel, pause, delete and resume."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Body, Header, Query, Response

from spkd.app import catalog
from spkd.app.deps import (
    JOB_ID,
    AppContext,
    Ctx,
    Owner,
    check_cursor,
    own_job,
)
from spkd.app.errors import ApiError, not_found
from spkd.app.openapi import documented, error_responses, job_links
from spkd.app.schemas import (
    Job,
    JobList,
    Status,
)
from spkd.common.errors import SpkdError
from spkd.common.spec import EXAMPLE_SPEC, JobSpec
from spkd.core import references, storage, store
from spkd.core.queue import devices_queue, enqueue, job_devices, revoke
from spkd.core.settings import Settings

log = logging.getLogger("spkd.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


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


def _check_devices(spec: JobSpec, settings: Settings) -> None:
    if spec.train.devices > settings.max_devices:
        raise ApiError(
            422,
            "too_many_devices",
            f"train.devices {spec.train.devices} is more than this service runs one job on "
            f"(SPKD_MAX_DEVICES={settings.max_devices}): ask for at most {settings.max_devices}",
            "train.devices",
        )


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


@router.post(
    "",
    status_code=201,
    response_model=Job,
    responses={**error_responses(400, 409, 422), 201: job_links("$response.body#/id")},
    summary="Create a job",
    description="Validates the spec (model names, weights, dataset) and queues the job. Send an "
    "`Idempotency-Key` header to make retries safe: the same key and body return the same job (200), "
    "the same key with another body is a 409.",
)
def create_job(
    ctx: Ctx,
    response: Response,
    owner: Owner,
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Job:
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    _check_models(spec, settings)
    _check_devices(spec, settings)
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
    _enqueue_or_fail(ctx, job_id, spec.train.devices)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return Job.from_store(job)


def _check_resumable_references(
    ctx: AppContext, owner: str, job: dict[str, Any], refuse: Callable[[str], ApiError]
) -> None:
    """What the job's spec names (dataset, weights, MLflow server) must still resolve, as the worker
    will check again: a dataset deleted since the failure is a 409 now, not a failed attempt later."""
    try:
        references.resolve_spec(ctx.redis, ctx.keys, ctx.settings, JobSpec.model_validate(job["spec"]), owner)
    except SpkdError as e:
        err = refuse(e.message)
        err.field = e.field
        raise err from e


def _enqueue_or_fail(ctx: AppContext, job_id: str, devices: int = 1) -> None:
    """Send the job to the workers that fit its `devices`; when the broker is down, fail the job
    (never queued forever) and answer 503."""
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    try:
        enqueue(ctx.celery, settings, job_id, devices)
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
    _say_if_no_worker_fits(ctx, job_id, devices)


def _say_if_no_worker_fits(ctx: AppContext, job_id: str, devices: int) -> None:
    """A job that no live worker can take (too few devices in every group) says so in a `warning`
    event instead of waiting silently; it still waits in its queue for such a worker."""
    if devices <= 1:
        return  # every worker takes one-device jobs
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    most = store.most_devices(store.live_workers(r, keys, settings.heartbeat_ttl_s, settings.queue))
    if most >= devices:
        return
    store.add_event(
        r,
        keys,
        job_id,
        "warning",
        f"no live worker has {devices} devices (the largest has {most}): the job waits in queue "
        f"{devices_queue(settings.queue, devices)!r} until one starts (`spkd worker --gpus` with "
        f"{devices} devices)",
        code="no_worker_fits",
        devices=devices,
        largest=most,
    )


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


_LIST_JOB_LINKS = job_links("$response.body#/data/0/id")["links"]
_LIST_JOB_LINKS["NextPage"] = {
    "operationId": "list_jobs_v1_jobs_get",
    "parameters": {"after": "$response.body#/next_cursor"},
}


@router.get(
    "",
    response_model=JobList,
    responses={**error_responses(400, 422), 200: {"links": _LIST_JOB_LINKS}},
    summary="List jobs, newest first",
)
def list_jobs(
    ctx: Ctx,
    owner: Owner,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(**documented(JOB_ID, "next_cursor of the previous page"))] = None,
    name: Annotated[str | None, Query(max_length=200, description="only jobs with this name")] = None,
    metadata: Annotated[
        list[str] | None,
        Query(max_length=600, description="key:value; only jobs whose metadata has it (repeat: all must)"),
    ] = None,
) -> JobList:
    r, keys = ctx.redis, ctx.keys
    after = check_cursor(after, JOB_ID, "after", "a job id (the next_cursor of a previous page)")
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


@router.get("/{job_id}", response_model=Job, responses=error_responses(404), summary="Retrieve a job")
def get_job(ctx: Ctx, owner: Owner, job_id: str) -> Job:
    return Job.from_store(own_job(ctx, owner, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    responses=error_responses(404, 409),
    summary="Cancel a job",
    description="A queued or paused job is cancelled at once and never runs again. A validating or "
    "running job gets a flag the engine checks every training step; it ends `cancelled` and frees the "
    "GPU. A 200 always ends `cancelled` (a job past its last step drops its results; a pause asked for "
    "before loses to it). Cancelling a cancelled job is a no-op; a succeeded or failed job is a 409 "
    "with its `status`.",
)
def cancel_job(ctx: Ctx, owner: Owner, job_id: str) -> Job:
    r, keys = ctx.redis, ctx.keys
    before = own_job(ctx, owner, job_id)
    try:
        job = store.request_cancel(r, keys, job_id)
    except store.Conflict as e:
        current = own_job(ctx, owner, job_id)["status"]
        raise _conflict("job_finished", f"job {job_id} already {current}; nothing to cancel", current) from e
    if before["status"] == store.QUEUED and job["status"] == store.CANCELLED:
        revoke(ctx.celery, job_id)
    return Job.from_store(job)


@router.post(
    "/{job_id}/pause",
    response_model=Job,
    responses=error_responses(404, 409),
    summary="Pause a job",
    description="A queued job is `paused` at once (it does not start). A validating or running job gets "
    "a flag (`pause_requested`) the engine checks every training step: it stops at the next step, "
    "moves to `paused` and frees its worker and GPU; the `paused` status event says how many training "
    "steps a resume redoes (checkpoints are taken at epoch ends: the steps run since the last one). "
    "`POST .../resume` continues it from that checkpoint. A job that finishes its last step before it "
    "can stop ends `succeeded`. Asking again while the flag is up is a no-op. 409 with the job's "
    "`status`: `job_finished` (succeeded, failed or cancelled), `job_paused` (already paused), "
    "`cancel_pending` (a cancel was accepted: it ends `cancelled`).",
)
def pause_job(ctx: Ctx, owner: Owner, job_id: str) -> Job:
    own_job(ctx, owner, job_id)
    try:
        job = store.request_pause(ctx.redis, ctx.keys, job_id)
    except store.NotPausable as e:
        raise _conflict(e.code, str(e), e.status) from e
    except KeyError:  # deleted between the ownership check and now
        raise not_found("job", job_id) from None
    return Job.from_store(job)


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 409),
    summary="Delete a job",
    description="Removes a finished or paused job: its record, events, artifacts (files and index) and "
    "the Idempotency-Keys that name it; its id is unknown (404) afterwards. A queued or running job is "
    "a 409 `job_active` with its `status`: cancel it first. A job whose weights a queued or running job "
    "uses (`weights: job:<id>`) is a 409 `job_in_use` with those job ids in `jobs`.",
)
def delete_job(ctx: Ctx, owner: Owner, job_id: str) -> Response:
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    try:
        job = storage.delete_job(r, keys, settings, job_id, owner)
    except store.InUse as e:
        raise ApiError(409, "job_in_use", str(e), jobs=e.jobs) from e
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


@router.post(
    "/{job_id}/resume",
    response_model=Job,
    responses=error_responses(404, 409),
    summary="Resume a paused, failed or cancelled job from its checkpoint",
    description="Queues a new attempt of a `paused`, `failed` or `cancelled` job that continues from its "
    "last epoch-end checkpoint (e.g. after freeing space for a `storage_full` failure). A paused job "
    "that never reached one (paused while queued or in its first epoch) starts from the beginning. Any "
    "other status, a failed or cancelled job without a checkpoint, or a run still shutting down is a "
    "409 `job_not_resumable` with the job's `status`.",
)
def resume_job(ctx: Ctx, owner: Owner, job_id: str) -> Job:
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    job = own_job(ctx, owner, job_id)

    def refuse(why: str) -> ApiError:
        return _conflict("job_not_resumable", f"job {job_id} is {job['status']}: {why}", job["status"])

    if job["status"] not in (store.PAUSED, store.FAILED, store.CANCELLED):
        raise refuse("only a paused, failed or cancelled job can be resumed")
    # A paused job stopped on request: without a checkpoint it starts over, which is all it lost.
    if job["status"] != store.PAUSED and not storage.has_checkpoint(settings, job_id):
        raise refuse("it has no checkpoint to resume from (it stopped before its first epoch ended)")
    if store.lease_held(r, keys, job_id):
        raise refuse("its last run is still shutting down; retry in a few seconds")
    _check_resumable_references(ctx, owner, job, refuse)
    try:
        job = store.resume_job(r, keys, job_id)
    except store.Conflict as e:  # resumed or changed by a concurrent request
        job = store.get_job(r, keys, job_id) or job
        raise refuse(str(e)) from e
    _enqueue_or_fail(ctx, job_id, job_devices(job["spec"]))
    return Job.from_store(job)
