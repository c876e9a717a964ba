"""The Celery task and the worker's lifecycle hooks (heartbeat for /readyz, orphan recovery)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from spkd.core import storage, store
from spkd.core.queue import TASK_NAME, enqueue, job_devices
from spkd.workers import webhooks as webhook_sender
from spkd.workers.celery_app import celery, settings
from spkd.workers.failures import failure_error
from spkd.workers.runner import execute_job

log = logging.getLogger("spkd.worker")
KEYS = store.Keys(settings.redis_prefix)
REQUEUE_GRACE_S = 600.0
WORKER_NAME = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


def _redis() -> Any:
    return store.connect(settings.redis_url)


@celery.task(name=TASK_NAME, bind=True)
def run_job(self: Any, job_id: str) -> str:
    """Run one job in this pool process (workers.runner.execute_job ends every failure of the run
    itself as a failed job). Nothing else escapes either: a task that raised would be acked and
    forgotten by Celery, leaving a queued job that never runs. SystemExit and KeyboardInterrupt
    (this process is being shut down) pass: the message is redelivered and the job resumes."""
    try:
        outcome = execute_job(_redis(), KEYS, settings, job_id, WORKER_NAME, settings.device or None)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001 - see the docstring
        outcome = fail_unrun(job_id, e)
    log.info("job %s: %s", job_id, outcome)
    return outcome


def fail_unrun(job_id: str, exc: BaseException) -> str:
    """End a job that `execute_job` could not even start or wind up (its record unreadable, a bug
    around the lease): `failed` with workers.failures.failure_error's code (`internal` for a bug),
    unless it is final already or another attempt holds its lease. Redis unreachable: nothing to
    write; a started job is requeued by the orphan sweep once Redis is back. Returns the outcome."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        log.warning("job %s: Redis unreachable (%s); left for recovery", job_id, exc)
        return "redis_lost"
    log.error("job %s: the worker could not run it", job_id, exc_info=exc)
    try:
        r = _redis()
        if store.lease_held(r, KEYS, job_id):
            return "busy"  # another attempt runs it: its outcome is the job's
        status, stage = r.hmget(KEYS.job(job_id), "status", "stage")
        if status not in store.ACTIVE:
            return "skipped"  # final already (or gone): ended once, not twice
        where = (stage or "validating") if status == store.RUNNING else status
        error = failure_error(exc, where, job_id)
        store.transition(
            r,
            KEYS,
            job_id,
            store.FAILED,
            store.ACTIVE,
            f"failed: {error['message']}",
            {"stage": where},
            error=error,
        )
    except store.CancelPending:
        with contextlib.suppress(Exception):
            store.transition(r, KEYS, job_id, store.CANCELLED, store.ACTIVE, "cancelled")
        return "cancelled"
    except store.Conflict:
        return "skipped"
    except Exception:  # noqa: BLE001 - the record may be what is broken; the failure is logged above
        # transition() re-reads the job after writing: an undecodable record fails there, once written.
        status = _status(job_id)
        if status != store.FAILED:
            log.exception("job %s: could not be marked failed (status %s)", job_id, status)
            return "error"
    return "failed"


def _status(job_id: str) -> str | None:
    try:
        return _redis().hget(KEYS.job(job_id), "status")
    except Exception:  # noqa: BLE001 - only for a log line
        return None


# ---------------------------------------------------------------- heartbeat (parent process only)


class Heartbeat(threading.Thread):
    """Tells /readyz this worker is alive. Uses its own Redis client, never shared with children."""

    def __init__(self) -> None:
        super().__init__(name="spkd-heartbeat", daemon=True)
        self.stop = threading.Event()
        self.r = store.connect(settings.redis_url, health_check_interval=30)
        self.info = {
            "queue": settings.queue,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "devices": settings.worker_devices,
            "started_at": time.time(),
        }

    def run(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                store.heartbeat(self.r, KEYS, WORKER_NAME, self.info, settings.heartbeat_ttl_s)
                # A job whose worker died keeps its status but loses its lease after lease_ttl_s.
                # Every lease TTL: a dead worker's job is requeued within ~2 TTLs of its death.
                if time.monotonic() - last_sweep > max(settings.heartbeat_s, settings.lease_ttl_s):
                    last_sweep = time.monotonic()
                    recover_orphans()
            except Exception as e:  # noqa: BLE001 - keep beating once Redis is back
                log.warning("heartbeat failed: %s", e)
            if self.stop.wait(settings.heartbeat_s):
                return


_heartbeat: Heartbeat | None = None


class Sweeper(threading.Thread):
    """At worker start and every SPKD_SWEEP_INTERVAL_S: remove leftovers (core.storage.sweep) and
    apply retention (SPKD_JOB_TTL_DAYS, SPKD_DATASET_TTL_DAYS). Its own thread, so deleting many
    files never delays the heartbeat."""

    def __init__(self) -> None:
        super().__init__(name="spkd-sweeper", daemon=True)
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            sweep_once()
            if self.stop.wait(settings.sweep_interval_s):
                return


def sweep_once() -> None:
    """One sweep and retention pass; errors are logged (the next pass retries)."""
    r = _redis()
    for step in (storage.sweep, storage.apply_retention):
        try:
            step(r, KEYS, settings)
        except Exception:  # noqa: BLE001 - best effort: Redis down, a volume unmounted...
            log.exception("%s failed", step.__name__)


_sweeper: Sweeper | None = None


def recover_orphans() -> list[str]:
    """Jobs left validating/running with no live lease lost their worker: queue them again (the
    engine resumes from its checkpoint; the lease keeps a late duplicate from running in parallel)."""
    r = _redis()
    requeued = []
    for status in (store.VALIDATING, store.RUNNING):
        for job_id in store.job_ids_with_status(r, KEYS, status):
            # Checked and marked in one script: no live lease, and not requeued recently (e.g. the
            # only worker is busy: once is enough).
            message = "its worker was lost; queued again to resume"
            if not store.claim_orphan(r, KEYS, job_id, REQUEUE_GRACE_S, message):
                continue
            job = store.get_job(r, KEYS, job_id) or {}
            enqueue(celery, settings, job_id, job_devices(job.get("spec") or {}))
            requeued.append(job_id)
    if requeued:
        log.warning("requeued orphaned jobs: %s", ", ".join(requeued))
    return requeued


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    global _heartbeat, _sweeper
    _heartbeat = Heartbeat()
    _heartbeat.start()
    webhook_sender.start(settings, WORKER_NAME)  # job events -> signed webhooks (workers/webhooks.py)
    _sweeper = Sweeper()
    _sweeper.start()
    try:
        recover_orphans()
    except Exception:  # noqa: BLE001 - recovery is best effort; the worker still serves
        log.exception("orphan recovery failed")


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    webhook_sender.stop()
    if _sweeper is not None:
        _sweeper.stop.set()
    if _heartbeat is not None:
        _heartbeat.stop.set()
        with contextlib.suppress(Exception):
            store.remove_worker(_heartbeat.r, KEYS, WORKER_NAME)
