"""The Celery app the workers run: the shared config (app.queue) plus worker-side settings.

One worker process per GPU, concurrency 1, prefork pool: the parent never touches CUDA; each job
runs in a child that owns its CUDA context and is replaced after every job
(max_tasks_per_child=1), so GPU memory and any leaked state go with it (DESIGN.md section 4).
"""

from __future__ import annotations

from app.queue import make_celery
from app.settings import get_settings

settings = get_settings()
celery = make_celery(settings)
celery.conf.update(
    include=["workers.tasks"],
    worker_concurrency=1,
    worker_pool="prefork",
    worker_max_tasks_per_child=1,
    # The hard stop after a cancel is ours (workers.runner.Monitor); no Celery time limits on
    # jobs that legitimately run for hours.
    task_time_limit=None,
    task_soft_time_limit=None,
)
