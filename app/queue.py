"""The Celery configuration shared by the API (producer) and the workers (consumers).

Celery itself is torch-free; the API only sends `spkd.run_job(job_id)` by name and never imports
workers/. Job state does not live in Celery (no result backend): it is in our own Redis keys.
"""

from __future__ import annotations

from celery import Celery

from app.settings import Settings

TASK_NAME = "spkd.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("spkd", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        task_ignore_result=True,
        # Long GPU jobs (DESIGN.md section 4): ack only when done, hold one message at a time,
        # requeue when the process running the task dies, and a visibility timeout longer than
        # any job so Redis never hands a running job to a second worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "global_keyprefix": f"{settings.redis_prefix}:celery:",
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        accept_content=["json"],
        task_serializer="json",
    )
    return app


def enqueue(celery: Celery, settings: Settings, job_id: str) -> None:
    celery.send_task(TASK_NAME, args=[job_id], queue=settings.queue)
