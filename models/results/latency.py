"""Timing models side by side (models/results/deploy.py): onnxruntime CPU sessions, batch-1
latency percentiles and GPU throughput, each measured round-robin in one loop (the order rotating
each round) so load from other processes on the host hits every model alike and the ratios stay
meaningful on a busy machine. Measurements of one run on one host; nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from spkd.models.training.engine import Runtime

LATENCY_THREADS = 1
WARMUP_RUNS = 10
LATENCY_RUNS = 100
LATENCY_BUDGET_S = 30.0  # stop timing early (at least MIN_RUNS rounds) past this
MIN_RUNS = 20
GPU_WARMUP = 3
GPU_RUNS = 10


def onnx_session(path: Path | bytes, threads: int = LATENCY_THREADS) -> Any:
    """An onnxruntime CPU session with `threads` intra-op threads (inter-op 1, all graph
    optimisations). `path` may be the model's bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p95": round(float(np.percentile(ms, 95)), 4),
        "mean": round(float(ms.mean()), 4),
        "runs": int(ms.size),
    }


def round_robin(
    calls: dict[str, Callable[[], Any]],
    warmup: int,
    runs: int,
    budget_s: float = LATENCY_BUDGET_S,
    min_runs: int = MIN_RUNS,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each named function, timed side by side: every round calls each once,
    the order rotating by one per round. `warmup` untimed rounds first; at most `runs` timed rounds,
    fewer (never under `min_runs`) once `budget_s` has passed. `sync` runs before each clock
    reading (a CUDA synchronize)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    if sync:
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[name]()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
        if i + 1 >= min_runs and time.perf_counter() - start > budget_s:
            break
    return times


def cpu_latency(
    onnx_files: dict[str, Path],
    image_size: int,
    threads: int = LATENCY_THREADS,
    warmup: int = WARMUP_RUNS,
    runs: int = LATENCY_RUNS,
    sizes: dict[str, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Batch-1 latency (ms: p50, p95, mean, and the number of timed runs) of each ONNX file under
    onnxruntime on this CPU, timed round-robin (`round_robin`) on the same seeded input, at
    `image_size` px or at `sizes[name]` (a teacher measured at its own input size)."""
    calls = {}
    for name, path in onnx_files.items():
        s = (sizes or {}).get(name, image_size)
        x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
        session = onnx_session(path, threads)
        feed = {session.get_inputs()[0].name: x}
        calls[name] = lambda s=session, f=feed: s.run(None, f)
    return {name: _percentiles(t) for name, t in round_robin(calls, warmup, runs).items()}


def gpu_throughput(
    models: dict[str, torch.nn.Module],
    image_size: int,
    batch: int,
    runtime: Runtime,
    sizes: dict[str, int] | None = None,
) -> dict[str, float]:
    """Images per second of each model at `batch` on the runtime's GPU in its autocast precision
    (channels_last for CNNs, as in training), timed round-robin, at `image_size` px or at
    `sizes[name]`. Copies the models to the GPU; the originals stay where they are. Raises
    RuntimeError off CUDA."""
    if not runtime.is_cuda:
        raise RuntimeError("gpu_throughput needs a CUDA runtime")
    from spkd.models.training.engine import prepare

    calls = {}
    for name, model in models.items():
        s = (sizes or {}).get(name, image_size)
        x = torch.randn(batch, 3, s, s, device=runtime.device)
        m = prepare(copy.deepcopy(model).eval(), runtime)
        xm = x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x

        def call(m: torch.nn.Module = m, xm: torch.Tensor = xm) -> None:
            with torch.inference_mode(), runtime.autocast():
                m(xm)

        calls[name] = call
    times = round_robin(
        calls, GPU_WARMUP, GPU_RUNS, budget_s=LATENCY_BUDGET_S, min_runs=3, sync=torch.cuda.synchronize
    )
    return {name: round(batch * len(t) / sum(t), 2) for name, t in times.items()}
