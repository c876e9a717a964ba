"""The Celery app the workers run: the shared config (core.queue) plus worker-side settings.

One worker process per GPU, concurrency 1, prefork pool: the parent never touches CUDA; each job
runs in a child that owns its CUDA context and is replaced after every job
(max_tasks_per_child=1), so GPU memory and any leaked state go with it
(docs/architecture.md#6-workers-and-gpus).
"""

from __future__ import annotations

from billiard.process import current_process
from celery.signals import worker_process_init

from spkd.core.queue import make_celery
from spkd.core.settings import get_settings

settings = get_settings()
celery = make_celery(settings)
celery.conf.update(
    include=["spkd.workers.tasks"],
    worker_concurrency=1,
    worker_pool="prefork",
    worker_max_tasks_per_child=1,
    # The hard stop after a cancel is ours (workers.runner.Monitor); no Celery time limits on
    # jobs that legitimately run for hours.
    task_time_limit=None,
    task_soft_time_limit=None,
)


@worker_process_init.connect
def _allow_loader_processes(**_: object) -> None:
    """Let the job process start DataLoader workers.

    Celery marks pool children daemonic, and a daemonic process may not have children, so a job
    with `train.num_workers` > 0 (the default on a multi-core host) would die at its first batch.
    The job process is replaced after every job (max_tasks_per_child=1) and torch's loader workers
    exit when their parent goes, so nothing outlives the job.
    """
    current_process()._config["daemon"] = False
