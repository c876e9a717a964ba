"""`spkd serve` (the API under uvicorn) and `spkd worker` (a Celery worker for one GPU)."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

import typer

# Seconds `spkd serve` waits on SIGTERM for open requests before it cuts them: live-event streams
# never end by themselves, and compose's stop_grace_period (SIGKILL after) is longer than this.
SERVE_GRACE_S = 10


def serve(
    host: str = typer.Option("127.0.0.1", help="address to bind; keys are required off loopback"),
    port: int = typer.Option(8000, help="TCP port"),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Start the REST API (FastAPI + uvicorn). Refuses to start without API keys unless
    SPKD_ALLOW_OPEN=true and the host is loopback."""
    from spkd.app.auth import check_can_serve
    from spkd.core.settings import get_settings

    check_can_serve(get_settings(), host)
    if workers > 1:
        _multiprocess_metrics()
    import uvicorn

    uvicorn.run(
        "spkd.app.main:app",
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=True,
        timeout_graceful_shutdown=SERVE_GRACE_S,
    )


def _multiprocess_metrics() -> None:
    """Several API processes: each writes its request metrics to a private, fresh folder that any
    of them reads at scrape time (prometheus_client multiprocess mode). Set before the processes
    start, since prometheus_client picks its storage when first imported."""
    from spkd.app.metrics import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        return  # the operator chose the folder
    folder = tempfile.mkdtemp(prefix="spkd-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def worker(
    gpu: str | None = typer.Option(None, help="GPU index for this worker (sets CUDA_VISIBLE_DEVICES)"),
    gpus: str | None = typer.Option(
        None, help="a group of GPUs for this worker (0,1,2,3): it takes jobs of up to that many train.devices"
    ),
    queue: str | None = typer.Option(None, help="queue to consume (default: SPKD_QUEUE)"),
    name: str | None = typer.Option(None, help="worker name (default: host-pid)"),
    loglevel: str = typer.Option("INFO", help="Celery log level"),
    preload: bool = typer.Option(True, help="import torch/timm in the parent so each job starts faster"),
) -> None:
    """Start a Celery worker that runs one job at a time on one GPU.

    Prefork pool, concurrency 1, a fresh child per job: the parent never initialises CUDA (CUDA and
    fork do not mix), the child that runs a job owns its CUDA context and exits after it.
    """
    # Before anything imports torch: this process and its children see only this GPU.
    if gpu is not None and gpus is not None:
        raise typer.BadParameter("give --gpu (one device) or --gpus (a group), not both")
    if gpus is not None:  # the job's ranks see these as cuda:0..N-1
        gpu = ",".join(g.strip() for g in gpus.split(",") if g.strip())
        os.environ["SPKD_GPUS"] = gpu
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    # torch.cuda.is_available() via NVML: answering it must not initialise CUDA in the parent.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if queue:
        os.environ["SPKD_QUEUE"] = queue
    node = name or f"spkd-{gpu.replace(',', '-') if gpu is not None else 'cpu'}-{os.getpid()}"
    os.environ["SPKD_WORKER_NAME"] = node
    if preload:
        _preload_engine()
    from spkd.core.queue import worker_queues
    from spkd.workers.celery_app import celery, settings

    argv = [
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        "--max-tasks-per-child=1",
        f"--queues={','.join(worker_queues(settings.queue, settings.worker_devices))}",
        f"--hostname={node}@{socket.gethostname()}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        # Heartbeats stay on: Flower and `celery inspect` show a worker only while they arrive.
    ]
    celery.worker_main(argv)


def _preload_engine() -> None:
    """Import the engine once in the parent so every forked job process starts with it loaded
    (seconds per job otherwise). Importing torch does not create a CUDA context; check that it
    stays so before forking."""
    try:
        import torch

        import spkd.models.pipeline  # noqa: F401
    except ImportError:
        return
    if torch.cuda.is_initialized():
        raise SystemExit("CUDA was initialised in the worker parent; it must only happen in job processes")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `spkd` app."""
    app.command("serve")(serve)
    app.command("worker")(worker)
