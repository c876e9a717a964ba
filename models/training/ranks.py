"""Launch a job's ranks: `train.devices` > 1 runs the job as N processes of one torch.distributed
group (models/training/distributed.py).

The calling process is rank 0: it keeps the job's reporter (events, progress, the stop flag, the
fencing token), its output folder and every write. Ranks 1..N-1 are spawned with
torch.multiprocessing (spawn: CUDA and fork do not mix); each runs the same pipeline through the
last training stage with a silent reporter and a private scratch folder seeded with the job's
checkpoints (so a resumed job resumes on every rank, whatever N the last attempt had). Rank 0
stops the others: a stop it hears is all-reduced at the next step, and when it leaves (done,
stopped, failed, fenced) it ends every rank still running. A rank that dies breaks the group's
collectives, so rank 0 fails instead of waiting (gloo at once, else after the group's timeout).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from common.errors import SpkdError
from common.reporter import NullReporter, Reporter, StopRequested
from common.spec import JobSpec
from models.training import checkpoint, distributed

COLLECTIVE_TIMEOUT_S = 300.0  # a rank silent this long (a hung GPU) fails the attempt
JOIN_S = 10.0  # how long rank 0 waits for the others to leave before it kills them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str | None, rank: int) -> str:
    """Rank r's device: cuda:r of the worker's visible group (CUDA_VISIBLE_DEVICES), else the CPU."""
    if device is not None and not device.startswith("cuda"):
        return device
    if torch.cuda.is_available():
        return f"cuda:{rank}"
    return "cpu"


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def run_ranks(
    run_job: Callable[..., dict],
    spec: JobSpec,
    data_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: str | None,
    data_path: str,
    job_id: str | None,
) -> dict:
    """Run the job as `spec.train.devices` ranks; returns rank 0's metrics (run_job's result).

    Raises what rank 0 raised (StopRequested, Fenced, SpkdError...), or SpkdError `rank_failed`
    when another rank died or raised first."""
    world = spec.train.devices
    dev0 = rank_device(device, 0)
    if dev0.startswith("cuda") and torch.cuda.device_count() < world:
        raise SpkdError(
            "not_enough_devices",
            f"train.devices {world}, but this worker sees {torch.cuda.device_count()} GPU(s): "
            "start it with `spkd worker --gpus` naming enough devices",
            "train.devices",
        )
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="spkd-ranks-"))
    shutil.rmtree(scratch)
    args = (
        run_job,
        spec.model_dump_json(),
        str(data_dir),
        str(out_dir),
        str(scratch),
        device,
        data_path,
        world,
        port,
    )
    others = mp.start_processes(_rank_main, args=args, nprocs=world - 1, join=False, start_method="spawn")
    try:
        init_rank(0, world, port, dev0, spec)
        reporter.event("info", f"training on {world} ranks ({backend_for(dev0)})", devices=world)
        try:
            return run_job(spec, data_dir, out_dir, reporter, dev0, data_path, job_id)
        except StopRequested:
            raise  # every rank stopped with it
        except Exception as e:
            failed = _rank_error(others)  # a broken collective: name the rank that broke it
            if failed is None:
                raise
            raise failed from e
    finally:
        distributed.shutdown()
        _end(others)
        shutil.rmtree(scratch, ignore_errors=True)


def init_rank(rank: int, world: int, port: int, device: str, spec: JobSpec) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    distributed.init(rank, world, port, backend_for(device), COLLECTIVE_TIMEOUT_S, spec.train.sync_batchnorm)


def _rank_main(
    i: int,
    run_job: Callable[..., dict],
    spec_json: str,
    data_dir: str,
    out_dir: str,
    scratch: str,
    device: str | None,
    data_path: str,
    world: int,
    port: int,
) -> None:
    """Rank i+1: the same job with a silent reporter, writing only into its own scratch folder."""
    rank = i + 1
    spec = JobSpec.model_validate_json(spec_json)
    mine = Path(scratch) / f"rank-{rank}"
    _seed_scratch(Path(out_dir), mine)
    dev = rank_device(device, rank)
    init_rank(rank, world, port, dev, spec)
    try:
        run_job(spec, Path(data_dir), mine, NullReporter(), dev, data_path, None)
    finally:
        distributed.shutdown()


def _seed_scratch(out_dir: Path, mine: Path) -> None:
    """The job's checkpoints, copied, so this rank resumes where rank 0 does."""
    src = checkpoint.checkpoint_dir(out_dir)
    dst = checkpoint.checkpoint_dir(mine)
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export", "*.tmp*"))
    mine.mkdir(parents=True, exist_ok=True)


def _rank_error(others: Any) -> SpkdError | None:
    """A rank that died or raised, as the error the job fails with (None: all are fine)."""
    try:
        others.join(timeout=2.0)
    except mp.ProcessExitedException as e:
        return SpkdError(
            "rank_failed", f"rank {e.error_index + 1} of the job died ({e}); resume the job to continue"
        )
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        return SpkdError("rank_failed", f"rank {e.error_index + 1} of the job failed: {last}")
    return None


def _end(others: Any) -> None:
    """Wait a little for the other ranks to leave, then kill what is left."""
    for p in others.processes:
        p.join(JOIN_S if p.is_alive() else 0)
    for p in others.processes:
        if p.is_alive():
            p.kill()
            p.join(5)


def leader() -> bool:
    """Whether this process writes (rank 0, or the one process of a one-device job)."""
    group = distributed.active()
    return group is None or group.leader
