"""Turn a queued job into a run of the engine: lease, validate, run, register artifacts, finish.

`execute_job` is what the Celery task calls; it is plain Python against the real store, so tests
can also call it in-process. torch is imported only inside the engine call, in the job's process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

import redis

from spkd.common import artifacts
from spkd.common.errors import SpkdError
from spkd.common.reporter import Fenced, StopRequested
from spkd.common.spec import JobSpec
from spkd.core import attempts, blobs, bucket, references, sources, storage, store
from spkd.core.settings import Settings
from spkd.workers.failures import failure_error
from spkd.workers.reporter import Monitor, RedisReporter

log = logging.getLogger("spkd.worker")

# ---------------------------------------------------------------- memory


def free_memory() -> None:
    """Give GPU memory back at once (the job process also exits after each job). gc.collect only
    when CUDA is in use: on a CPU host it costs seconds with torch loaded and frees nothing shared."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the run


def execute_job(
    r: redis.Redis, keys: store.Keys, settings: Settings, job_id: str, worker: str, device: str | None = None
) -> str:
    """Run one job to a final status. Returns what happened (for logs and tests)."""
    job = store.get_job(r, keys, job_id)
    if job is None:
        log.warning("job %s: not in the store; dropping the message", job_id)
        return "missing"
    if job["status"] in store.AT_REST:  # final, or paused since this message was sent
        log.info("job %s: already %s; nothing to do", job_id, job["status"])
        return "skipped"
    # Acquiring also takes this attempt's fencing token and clears requeued_at: an orphan requeue
    # (workers.tasks.recover_orphans) is used up now, so if this run dies too, the next sweep
    # requeues it again instead of waiting out the requeue grace period.
    lease = store.Lease(r, keys, job_id, settings.lease_ttl_s)
    if not lease.acquire():
        if not lease.take_over_dead_local_holder():
            log.warning(
                "job %s: another worker holds its lease (%s); not running it twice", job_id, lease.holder()
            )
            return "busy"
        log.warning("job %s: its previous process died; resuming", job_id)
        store.add_event(
            r,
            keys,
            job_id,
            "info",
            "the job's process died; resuming from the last checkpoint",
            fence=lease.fence,
        )
    try:
        outcome = _run_leased(r, keys, settings, job, lease, worker, device)
        if outcome in store.FINAL:  # this attempt ended the job: count it in the ops histograms
            _observe(r, keys, job_id)
        return outcome
    except Fenced as e:
        # Another attempt owns the job now: its state is not ours to touch, not even to fail it.
        log.warning("job %s: fenced off (%s); stopping without further writes", job_id, e)
        return "fenced"
    finally:
        lease.release()


def _run_leased(
    r: redis.Redis,
    keys: store.Keys,
    settings: Settings,
    job: dict[str, Any],
    lease: store.Lease,
    worker: str,
    device: str | None,
) -> str:
    job_id, fence = job["id"], lease.fence
    attempts = store.bump_attempts(r, keys, job_id, fence)
    resumed = job["status"] in (store.VALIDATING, store.RUNNING)
    if attempts > settings.max_attempts:
        error = {
            "code": "worker_lost",
            "message": f"the job's process died {attempts - 1} times without ending it (killed by the "
            "kernel's out-of-memory killer, a crash in native code, its host going down): see the worker's "
            f"log and the kernel log (dmesg); resume the job (POST /v1/jobs/{job_id}/resume) to continue "
            "from its last checkpoint",
            "field": None,
        }
        try:
            store.transition(
                r,
                keys,
                job_id,
                store.FAILED,
                store.ACTIVE,
                "failed: too many attempts",
                fence=fence,
                error=error,
            )
        except store.CancelPending:
            store.transition(r, keys, job_id, store.CANCELLED, store.ACTIVE, "cancelled", fence=fence)
            return "cancelled"
        return "failed"
    try:
        note = f"validating on {worker}" + (f" (attempt {attempts}, resuming)" if resumed else "")
        store.transition(
            r,
            keys,
            job_id,
            store.VALIDATING,
            store.ACTIVE,
            note,
            {"worker": worker},
            fence=fence,
            worker=worker,
        )
    except store.Conflict:
        return "skipped"  # cancelled between delivery and now
    monitor = Monitor(r, keys, job_id, lease, settings.cancel_poll_s, settings.hard_stop_s)
    monitor.start()
    try:
        outcome, error = _attempt(r, keys, settings, job, monitor, device)
        if error is not None:
            # Outside the except block: the failed frames (a MemoryError's, a CUDA OOM's) are
            # freed before the status is written.
            outcome = _fail(r, keys, job_id, fence, error)
        return outcome
    finally:
        # Cleanup never replaces how the job ended (a CUDA error raised again by empty_cache
        # after a failed kernel, say): logged, not raised.
        _quietly(job_id, "stopping the monitor", monitor.finish)
        _quietly(job_id, "freeing GPU memory", free_memory)


def _attempt(
    r: redis.Redis,
    keys: store.Keys,
    settings: Settings,
    job: dict[str, Any],
    monitor: Monitor,
    device: str | None,
) -> tuple[str, dict[str, Any] | None]:
    """Validate and run the job: (outcome, None), or ("failed", the error to fail it with) for any
    exception but those that are not the job's to end: Fenced (another attempt owns it),
    SystemExit and KeyboardInterrupt (this process is being shut down: the job resumes on the
    next attempt) and a lost Redis (left for recovery)."""
    job_id, fence = job["id"], monitor.lease.fence
    try:
        return _validate_and_run(r, keys, settings, job, monitor, device), None
    except StopRequested as stop:  # cancelled, paused, or the lease was lost
        return _stopped(r, keys, job_id, fence, monitor, stop), None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        # Redis is gone, not the job's fault: leave it running; once Redis is back its lease
        # expires and the orphan sweep queues it again to resume from its checkpoint.
        log.warning("job %s: Redis unreachable (%s); left for recovery", job_id, e)
        return "redis_lost", None
    except (Fenced, SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001 - whatever the engine raised ends the job, once
        error = failure_error(e, _stage_of(r, keys, job_id), job_id)
        if error["code"] == "internal":
            log.error("job %s: %s", job_id, error["message"], exc_info=e)
        else:
            log.warning("job %s: %s", job_id, error["message"], exc_info=not isinstance(e, SpkdError))
        return "failed", error


def _fail(r: redis.Redis, keys: store.Keys, job_id: str, fence: int | None, error: dict[str, Any]) -> str:
    """End the job `failed` with `error` (a cancel accepted meanwhile ends it `cancelled`)."""
    try:
        _finish(
            r,
            keys,
            job_id,
            fence,
            store.FAILED,
            f"failed: {error['message']}",
            {"stage": error["stage"]},
            error=error,
        )
    except (redis.ConnectionError, redis.TimeoutError) as e:
        # Not written: the lease expires, the orphan sweep requeues the job and the next attempt
        # meets the same error (or not) from the last checkpoint.
        log.warning("job %s: failure not recorded, Redis unreachable (%s); left for recovery", job_id, e)
        return "redis_lost"
    return "failed"


def _quietly(job_id: str, what: str, step: Any) -> None:
    try:
        step()
    except Exception:  # noqa: BLE001 - see the caller
        log.exception("job %s: %s failed", job_id, what)


def _observe(r: redis.Redis, keys: store.Keys, job_id: str) -> None:
    try:
        store.observe_finished_job(r, keys, job_id)
    except redis.RedisError as e:  # metrics only: never change how the job ended
        log.warning("job %s: run-time metrics not recorded: %s", job_id, e)


def _stage_of(r: redis.Redis, keys: store.Keys, job_id: str) -> str:
    """The stage the job was in (`validating` before its first stage); never raises. Raw fields:
    a record that does not decode still gets its failure recorded."""
    try:
        status, stage = r.hmget(keys.job(job_id), "status", "stage")
    except Exception as e:  # noqa: BLE001 - only for the message: a failure must still be recorded
        log.warning("job %s: its stage could not be read: %s", job_id, e)
        return "unknown"
    return (stage if status == store.RUNNING else None) or "validating"


def _finish(
    r: redis.Redis,
    keys: store.Keys,
    job_id: str,
    fence: int | None,
    to: str,
    message: str,
    event_data: dict[str, Any] | None = None,
    **fields: Any,
) -> None:
    """End the job (fenced: a run that lost the job raises Fenced here and ends nothing)."""
    try:
        store.transition(
            r, keys, job_id, to, [store.VALIDATING, store.RUNNING], message, event_data, fence=fence, **fields
        )
    except store.CancelPending:
        # The API answered 200 to a cancel: the job ends cancelled, whatever ended the run.
        _finish(r, keys, job_id, fence, store.CANCELLED, f"cancelled ({message}, after the cancel request)")
    except store.Conflict as e:
        log.info("job %s: not moved to %s: %s", job_id, to, e)


def _stopped(
    r: redis.Redis, keys: store.Keys, job_id: str, fence: int | None, monitor: Monitor, stop: StopRequested
) -> str:
    """The engine stopped because the Monitor asked it to: a lost lease leaves the job alone (another
    worker owns it now), a cancel ends it `cancelled`, a pause moves it to `paused` (fenced), saying
    how many training steps a resume redoes (checkpoints are taken at epoch ends). A cancel asked
    for before or after the pause wins. Returns the outcome."""
    if monitor.lease_lost:
        return "lease_lost"
    if monitor.cancel_seen_at is None and monitor.pause_seen_at is not None:
        where, redone = str(stop) or "stopped before training", monitor.steps_since_save
        redo = f"redoes the {redone} training step{'s' if redone > 1 else ''} run since it"
        message = f"paused ({where}); a resume continues from the last checkpoint and " + (
            redo if redone else "has nothing to redo"
        )
        try:
            store.transition(
                r,
                keys,
                job_id,
                store.PAUSED,
                [store.VALIDATING, store.RUNNING],
                message,
                {"steps_redone": redone, "stopped": where},
                fence=fence,
            )
            return "paused"
        except store.CancelPending:
            pass  # cancelled since the pause was seen: it ends cancelled
        except store.Conflict as e:
            log.info("job %s: not paused: %s", job_id, e)
            return "skipped"
    _finish(r, keys, job_id, fence, store.CANCELLED, "cancelled")
    return "cancelled"


def _validate_and_run(
    r: redis.Redis,
    keys: store.Keys,
    settings: Settings,
    job: dict[str, Any],
    monitor: Monitor,
    device: str | None,
) -> str:
    owner = job["owner"]
    spec = JobSpec.model_validate(job["spec"])
    # Again at run time, with the API's rules: files can change between submit and now.
    located, spec = references.resolve_spec(r, keys, settings, spec, owner)
    remote = blobs.remote(settings)
    if remote is not None:
        _fetch_job_weights(remote, settings, spec)
    from spkd.models.data import hub  # the engine's ImageFolder builders (imports `datasets` lazily)

    where = sources.Located(r, keys, settings, owner)
    with sources.materialise(where, spec.dataset, located, remote, hub) as data_dir:
        return _run_on(r, keys, settings, job, monitor, device, spec, data_dir, remote)


def _fetch_job_weights(remote: blobs.BlobStore, settings: Settings, spec: JobSpec) -> None:
    """`weights: job:<id>` resolved to `<artifact root>/<id>/[<attempt folder>/]<artifact>` (a hub
    folder's `teacher/model.safetensors`, or an old layout's `teacher.safetensors`): with a bucket,
    that file may be on another host; fetched from the bucket (sha256-checked) when it is not here,
    with the JSON that names its classes (common/artifacts.py) when the job has one."""
    root = references.artifact_dir(settings)
    for role in references.ROLE_FILES:
        path = Path(getattr(spec, role).weights)
        if not path.is_absolute() or not path.is_relative_to(root) or path.is_file():
            continue
        job_id, *rest = path.relative_to(root).parts
        output = rest[0] if len(rest) > 1 and attempts.number(rest[0]) is not None else None
        name = "/".join(rest[1:] if output else rest)
        try:
            remote.get_file(bucket.artifact_key(job_id, name, output), path)
        except FileNotFoundError:
            msg = f"job {job_id!r} has no {name} left in the object storage"
            raise SpkdError("weights_job_not_found", msg, f"{role}.weights") from None
        sidecar = artifacts.sidecar_name(name)
        # the class check reads it (models/training/validation.py); absent: not checked
        with contextlib.suppress(FileNotFoundError):
            remote.get_file(bucket.artifact_key(job_id, sidecar, output), path.with_name(Path(sidecar).name))


def _warn_if_gpu_missing(reporter: RedisReporter) -> None:
    """A worker started for a GPU (`spkd worker --gpu N` sets CUDA_VISIBLE_DEVICES) whose torch sees
    none (no driver, a CPU-only wheel, a container without the device) would train on the CPU,
    10-100x slower, without a word. Runs in the job's process, which may initialise CUDA."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1" and not torch.cuda.is_available():
        reporter.event(
            "warning",
            f"this worker was started for GPU {visible} (CUDA_VISIBLE_DEVICES) but torch sees no CUDA GPU: "
            "the job trains on the CPU; check the driver (nvidia-smi) and that the container has the GPU",
            gpu=visible,
        )


def _run_on(
    r: redis.Redis,
    keys: store.Keys,
    settings: Settings,
    job: dict[str, Any],
    monitor: Monitor,
    device: str | None,
    spec: JobSpec,
    data_dir: Path,
    remote: blobs.BlobStore | None,
) -> str:
    """Validate the dataset, run the engine, register the artifacts (uploaded first with a bucket)."""
    job_id, fence = job["id"], monitor.lease.fence
    from spkd.models.pipeline import validate_job  # torch: only in the job's process
    from spkd.models.results.tracking import run_tracked

    valid = validate_job(spec, data_dir)  # the one validation: the engine runs what it returns
    # run_valid logs each warning as an event itself; here they only go on the job record.
    store.update_job(r, keys, job_id, fence=fence, warnings=list(valid.warnings))
    if monitor.stop_requested:
        raise StopRequested()
    store.transition(r, keys, job_id, store.RUNNING, [store.VALIDATING], "running", fence=fence)
    # This attempt writes only into its own folder; the record names the one whose files count.
    job_root = storage.job_dir(settings, job_id)
    if remote is not None:  # resumable on any host: the newest published checkpoint, if newer
        fetched = bucket.fetch_checkpoint(remote, job_id, job_root, fence)
        if fetched is not None:
            log.info("job %s: checkpoint of attempt %d fetched from the bucket", job_id, fetched)
    out_dir, adopted = attempts.open_attempt(job_root, fence)
    if adopted is not None:
        log.info("job %s: attempt %d starts from attempt %d's checkpoint", job_id, fence, adopted)
    # Half-written files of this same attempt (a process of it killed mid-write).
    storage.remove_temporaries(out_dir)
    publish = bucket.CheckpointPublisher(remote, job_id, out_dir, fence) if remote is not None else None
    reporter = RedisReporter(
        r, keys, job_id, monitor, interval_s=settings.cancel_poll_s, on_checkpoint=publish
    )
    if device is None or device.startswith("cuda"):
        _warn_if_gpu_missing(reporter)
    # The engine publishes every file only after a fencing check (reporter.ensure_current).
    finished = run_tracked(
        valid,
        out_dir,
        reporter,
        job_id,
        settings,
        device=device,
        data_path=settings.data_path,
    )
    artifacts = finished.artifacts  # the engine's manifest of what it published
    if remote is not None:  # uploaded before they are registered: a partial upload never is
        bucket.upload_artifacts(remote, job_id, out_dir, artifacts, reporter.ensure_current)
    # Registry and final status in one fenced transaction: a stale attempt registers nothing.
    try:  # the artifacts are registered with the status, or not at all
        store.transition(
            r,
            keys,
            job_id,
            store.SUCCEEDED,
            [store.RUNNING],
            "succeeded",
            {"artifacts": [a["name"] for a in artifacts]},
            fence=fence,
            artifacts=artifacts,
            metrics=finished.metrics,
            output=out_dir.name,
        )
    except store.CancelPending:
        _finish(
            r, keys, job_id, fence, store.CANCELLED, "cancelled after its last stage; results not registered"
        )
        return "cancelled"
    attempts.remove_others(job_root, keep=out_dir.name)  # succeeded: only the current folder counts
    if remote is not None:  # succeeded: the published checkpoints are not needed any more
        try:
            remote.delete_prefix(bucket.checkpoint_prefix(job_id))
        except blobs.StorageUnavailable as e:
            log.warning("job %s: published checkpoints left in the bucket: %s", job_id, e.message)
    return "succeeded"
