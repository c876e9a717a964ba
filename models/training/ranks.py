"""Launch a job's ranks: `train.devices` > 1 runs the job as N processes of one torch.distributed
group (models/training/distributed.py).

The calling process is rank 0: it keeps the job's reporter (events, progress, the stop flag, the
fencing token), its output folder and every write. Ranks 1..N-1 are fresh interpreters (as
torchrun starts ranks: CUDA and fork do not mix, and a Celery pool process cannot be pickled for
multiprocessing's spawn); each runs the same pipeline through the
last training stage with a silent reporter and a private scratch folder seeded with the job's
checkpoints (so a resumed job resumes on every rank, whatever N the last attempt had). Rank 0
stops the others: a stop it hears is all-reduced at the next step, and when it leaves (done,
stopped, failed, fenced) it ends every rank still running. A rank that dies breaks the group's
collectives, so rank 0 fails instead of waiting (gloo at once, else after the group's timeout).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from spkd.common.errors import SpkdError
from spkd.common.reporter import NullReporter, Reporter, StopRequested
from spkd.common.spec import JobSpec
from spkd.models.training import checkpoint, distributed

T = TypeVar("T")

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
    run: Callable[[str], T],
    spec: JobSpec,
    data_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: str | None,
    data_path: str,
) -> T:
    """Run the job as `spec.train.devices` ranks: spawn ranks 1..N-1, then `run(device of rank 0)`
    in this process as rank 0; returns what that returns (models/pipeline.py `run_valid`).

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
    others = []
    try:
        for rank in range(1, world):
            others.append(_spawn_rank(rank, spec, data_dir, out_dir, scratch, device, data_path, port))
        init_rank(0, world, port, dev0, spec)
        reporter.event("info", f"training on {world} ranks ({backend_for(dev0)})", devices=world)
        try:
            return run(dev0)
        except StopRequested:
            raise  # every rank stopped with it
        except Exception as e:
            failed = _rank_error(others, scratch)  # a broken collective: name the rank that broke it
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


def _spawn_rank(
    rank: int,
    spec: JobSpec,
    data_dir: Path,
    out_dir: Path,
    scratch: Path,
    device: str | None,
    data_path: str,
    port: int,
) -> subprocess.Popen:
    """Rank `rank` as a fresh interpreter (as torchrun starts its ranks: no fork of a process that
    may hold CUDA, no pickling of a Celery pool process's state)."""
    job = {
        "rank": rank,
        "world": spec.train.devices,
        "spec": spec.model_dump(mode="json"),
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "scratch": str(scratch),
        "device": device,
        "data_path": data_path,
        "port": port,
        "parent": os.getpid(),
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = "from spkd.models.training.ranks import rank_main; rank_main()"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(job)], env=env)


def rank_main() -> None:
    """A spawned rank (argv[1]: its JSON job): the same job with a silent reporter, writing only
    into its own scratch folder. Exits 0 when it ends or is stopped with the others; on an error it
    leaves the error's last line in `<scratch>/rank-<n>.error` for rank 0 to report."""
    from spkd.models.pipeline import run_job

    job = json.loads(sys.argv[1])
    rank, scratch = job["rank"], Path(job["scratch"])
    _exit_with_parent(job["parent"])
    try:
        spec = JobSpec.model_validate(job["spec"])
        mine = scratch / f"rank-{rank}"
        _seed_scratch(Path(job["out_dir"]), mine)
        dev = rank_device(job["device"], rank)
        init_rank(rank, job["world"], job["port"], dev, spec)
        run_job(spec, Path(job["data_dir"]), mine, NullReporter(), dev, job["data_path"], None)
    except StopRequested:
        pass
    except BaseException as e:
        (scratch / f"rank-{rank}.error").write_text(f"{type(e).__name__}: {e}"[:2000])
        raise
    finally:
        distributed.shutdown()


def _exit_with_parent(parent: int) -> None:
    """Leave at once when rank 0 (the job process) is gone, e.g. killed -9 by the worker's hard
    stop: a rank waiting outside a collective (decoding, joining the group) would otherwise
    linger, holding its GPU, until the group's timeout."""

    if sys.platform == "linux":  # the kernel's own signal when the parent dies
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # it died while this interpreter was starting
        os._exit(1)
    threading.Thread(target=watch, name="spkd-rank-parent", daemon=True).start()


def _seed_scratch(out_dir: Path, mine: Path) -> None:
    """The job's checkpoints, copied, so this rank resumes where rank 0 does."""
    src = checkpoint.checkpoint_dir(out_dir)
    dst = checkpoint.checkpoint_dir(mine)
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export", "*.tmp*"))
    mine.mkdir(parents=True, exist_ok=True)


def _rank_error(others: list[subprocess.Popen], scratch: Path) -> SpkdError | None:
    """A rank that died or raised, as the error the job fails with (None: all are fine)."""
    deadline = time.monotonic() + 5.0  # a broken collective reaches every rank within moments
    while time.monotonic() < deadline and not any(p.poll() for p in others):
        time.sleep(0.1)
    for rank, p in enumerate(others, start=1):
        code = p.poll()
        if not code:
            continue
        error = scratch / f"rank-{rank}.error"
        if error.is_file():
            return SpkdError("rank_failed", f"rank {rank} of the job failed: {error.read_text()}")
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return SpkdError(
            "rank_failed", f"rank {rank} of the job died ({how}); the job resumes from its last checkpoint"
        )
    return None


def _end(others: list[subprocess.Popen]) -> None:
    """Wait a little for the other ranks to leave, then kill what is left."""
    deadline = time.monotonic() + JOIN_S
    for p in others:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def leader() -> bool:
    """Whether this process writes (rank 0, or the one process of a one-device job)."""
    group = distributed.active()
    return group is None or group.leader
