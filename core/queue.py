"""The Celery configuration shared by the API (producer) and the workers (consumers).

Celery itself is torch-free; the API only sends `spkd.run_job(job_id)` by name and never imports
workers/. Job state does not live in Celery (no result backend): it is in our own Redis keys.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from spkd.core.settings import Settings

TASK_NAME = "spkd.run_job"
log = logging.getLogger("spkd.api")


def make_celery(settings: Settings) -> Celery:
    app = Celery("spkd", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        task_ignore_result=True,
        # Long GPU jobs (docs/architecture.md#6-workers-and-gpus): ack only when done, hold one
        # message at a time, requeue when the process running the task dies, and a visibility
        # timeout longer than any job so Redis never hands a running job to a second worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "global_keyprefix": f"{settings.redis_prefix}:celery:",
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Task events and worker heartbeats on, so Flower (and `celery events`) see every worker
        # and the running job; with one task per job their traffic is negligible.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Celery 6 turns this on by default: a Redis blip would then cancel every running job,
        # hours of GPU time each. Off: the job keeps running and is acked late when Redis returns.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        accept_content=["json"],
        task_serializer="json",
    )
    return app


def devices_queue(base: str, devices: int) -> str:
    """The queue of jobs asking for `devices` (train.devices): `base` itself for one device (as
    before), `<base>.devices.<n>` for more."""
    return base if devices <= 1 else f"{base}.devices.{devices}"


def worker_queues(base: str, devices: int) -> list[str]:
    """What a worker owning `devices` consumes: every job size it fits, so a 4-GPU job never lands
    on a 1-GPU worker and one-device jobs still run everywhere."""
    return [devices_queue(base, n) for n in range(1, max(1, devices) + 1)]


def job_devices(spec: dict[str, Any]) -> int:
    """train.devices of a stored job spec (1 when absent: jobs stored before the field)."""
    return int((spec.get("train") or {}).get("devices") or 1)


def enqueue(celery: Celery, settings: Settings, job_id: str, devices: int = 1) -> None:
    # The job id is the task id, so a cancel can revoke the message by name (see revoke).
    queue = devices_queue(settings.queue, devices)
    celery.send_task(TASK_NAME, args=[job_id], queue=queue, task_id=job_id)


def revoke(celery: Celery, job_id: str) -> None:
    """Tell the workers to drop a cancelled job's queued message in their main process. Without
    it each cancelled message still costs a fresh job process (max_tasks_per_child=1: seconds
    each), so a queue of cancelled jobs would keep the worker from the next real one. Best
    effort: a worker that misses it still finds the job final and skips it."""
    try:
        celery.control.revoke(job_id)
    except Exception as e:  # noqa: BLE001 - the cancel itself is already recorded
        log.warning("revoke of %s failed: %s", job_id, e)


# kombu's Redis transport keeps one list per priority step: the queue's name for priority 0, and
# name + "\x06\x16" + step for the others (kombu.transport.redis, PRIORITY_STEPS and `sep`).
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEP = "\x06\x16"


def queue_depth(r: Any, settings: Settings) -> int:
    """Messages waiting in the job queue (delivered-but-unacked ones are not counted)."""
    prefix = f"{settings.redis_prefix}:celery:"
    names = [settings.queue] + [f"{settings.queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS[1:]]
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.llen(prefix + name)
    return sum(pipe.execute())
