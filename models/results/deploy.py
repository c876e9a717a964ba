"""What each model of a job costs to run, measured side by side, and the int8 student with its price.

For the teacher, the baseline student and the shipped student (`metrics.json` -> `deploy`):

- parameters (the sum of `numel` over `model.parameters()`);
- FLOPs of one image at the job's image size, counted by `torch.utils.flop_counter.FlopCounterMode`
  (matrix multiplications and convolutions, 2 FLOPs per multiply-add; elementwise operations such
  as activations and normalisation are not counted), and MACs = FLOPs / 2;
- the bytes of the weight file (`<folder>/model.safetensors` of the hub folder) and of the ONNX
  export (the same exporter as `student.onnx`, models/results/export.py);
- CPU latency under onnxruntime: batch 1, `LATENCY_THREADS` intra-op thread, p50 and p95 of
  `LATENCY_RUNS` timed runs after `WARMUP_RUNS` untimed ones. The models are timed round-robin in
  one loop (the order rotating each round), so load from other processes on the host hits them
  alike and the ratios stay meaningful on a busy machine;
- on a GPU worker, throughput (images/s) at the job's batch size in the precision training used
  (torch with the job's autocast dtype), the same round-robin way.

int8 (`export.int8`): onnxruntime's post-training static quantisation of `student.onnx`
(`quantize_static`, QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration on
`CALIBRATION_IMAGES` training images drawn with `train.seed` and preprocessed exactly like
evaluation), written as `student.int8.onnx`; its accuracy on the report split against the fp32 ONNX
model's on the same images with the statistics of the distillation gain (models/results/stats.py:
paired bootstrap interval, McNemar), how often both give the same top-1, and its latency beside the
others. It loses more than `export.int8_max_drop` points: still written, `usable: false`, and a
`warning` event says not to use it.

Timings are measurements of one run on one host; nothing here asserts a speed.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spkd.common.files import storage_full
from spkd.models.results import export, stats
from spkd.models.results.deploy_report import int8_warning
from spkd.models.results.latency import (
    LATENCY_RUNS,
    LATENCY_THREADS,
    WARMUP_RUNS,
    cpu_latency,
    gpu_throughput,
    onnx_session,
)

if TYPE_CHECKING:
    from spkd.models.training.engine import Runtime
    from spkd.models.training.run import Run

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 16
EVAL_BATCH = 64
INT8_FILE = "student.int8.onnx"
FLOPS_COUNTER = "torch.utils.flop_counter.FlopCounterMode (matmul and convolution FLOPs; MACs = FLOPs/2)"
STUDENT_ONNX = "student.onnx"
WEIGHTS_FILE = "model.safetensors"  # timm's hub layout (models/results/export.py save_hub_folder)


# ------------------------------------------------------------------------------ counting
def param_count(model: torch.nn.Module) -> int:
    """Number of parameters: the sum of `numel` over `model.parameters()` (buffers not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass of one image (1 x 3 x S x S, fp32, CPU, eval mode) as
    `torch.utils.flop_counter.FlopCounterMode` counts them: matmuls and convolutions, 2 per
    multiply-add. Moves the model to the CPU in fp32 (as the ONNX export does)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------ int8
class _Reader:
    """A CalibrationDataReader over float32 batches (onnxruntime calls get_next until None)."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name, self._it = input_name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}


def quantize_int8(fp32: Path, dest: Path, calibration: Iterable[np.ndarray]) -> None:
    """Post-training static quantisation of the ONNX model `fp32` into `dest` with onnxruntime:
    `quant_pre_process` (shape inference and graph optimisation, onnxruntime's recommended first
    step; skipped when it fails on a graph), then `quantize_static` in QDQ format with per-channel
    int8 weights and uint8 activations (U8S8, the fast path of onnxruntime's x86 kernels),
    MinMax-calibrated on `calibration` (normalised float32 N x 3 x S x S batches). Written to a
    temporary name and renamed; raises what onnxruntime raises (nothing is left behind then)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dest.parent) as tmp:
        source = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(source))
        except Exception as exc:  # noqa: BLE001 - an optional optimisation; quantise the export as it is
            log.warning("onnxruntime quant_pre_process failed (%s); quantising the export as it is", exc)
            source = fp32
        input_name = onnx_session(source).get_inputs()[0].name
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(source),
            str(out),
            _Reader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        os.replace(out, dest)


def onnx_predict(session: Any, batches: Iterable[np.ndarray]) -> list[int]:
    """Top-1 class of every image of `batches` (normalised float32 N x 3 x S x S) under `session`."""
    name = session.get_inputs()[0].name
    preds: list[int] = []
    for x in batches:
        for start in range(0, len(x), EVAL_BATCH):
            (logits,) = session.run(None, {name: x[start : start + EVAL_BATCH]})
            preds += np.asarray(logits).argmax(1).tolist()
    return preds


def int8_verdict(fp32_acc: float, int8_acc: float, max_drop_points: float) -> tuple[float, bool]:
    """(points int8 loses against fp32, usable): usable when the loss is at most `max_drop_points`.
    Accuracies are fractions in [0, 1]; a negative loss is a gain."""
    drop = round(100 * (fp32_acc - int8_acc), 4)
    return drop, drop <= max_drop_points


def int8_block(
    fp32_onnx: Path,
    dest: Path,
    calibration: Iterable[np.ndarray],
    report: Callable[[], Iterator[tuple[np.ndarray, list[int]]]],
    class_names: list[str],
    max_drop_points: float,
    seed: int,
) -> dict[str, Any]:
    """Quantise `fp32_onnx` into `dest` (quantize_int8) and score both on the report split
    (`report()` yields (normalised float32 batch, labels)): accuracies, the paired comparison
    int8 vs fp32 (stats.compare, names fp32/int8), top-1 agreement, the drop and whether it is
    usable (int8_verdict). The caller adds latency and calibration details."""
    quantize_int8(fp32_onnx, dest, calibration)
    fp32, int8 = onnx_session(fp32_onnx), onnx_session(dest)
    labels: list[int] = []
    preds_fp32: list[int] = []
    preds_int8: list[int] = []
    for x, y in report():
        labels += list(y)
        preds_fp32 += onnx_predict(fp32, [x])
        preds_int8 += onnx_predict(int8, [x])
    n = max(1, len(labels))
    acc32 = sum(int(p == t) for p, t in zip(preds_fp32, labels, strict=True)) / n
    acc8 = sum(int(p == t) for p, t in zip(preds_int8, labels, strict=True)) / n
    drop, usable = int8_verdict(acc32, acc8, max_drop_points)
    cmp = stats.compare(labels, preds_fp32, preds_int8, class_names, seed=seed, names=("fp32", "int8"))
    return {
        "file": dest.name,
        "onnx_bytes": dest.stat().st_size,
        "accuracy": acc8,
        "fp32_accuracy": acc32,
        "drop_points": drop,
        "max_drop_points": max_drop_points,
        "usable": usable,
        "agreement": round(sum(int(a == b) for a, b in zip(preds_fp32, preds_int8, strict=True)) / n, 6),
        "comparison": {
            k: cmp[k] for k in ("n", "gain_points", "ci95_points", "bootstrap", "mcnemar", "verdict")
        },
    }


# ------------------------------------------------------------------------------ the summary
def ratio_text(ratio: float, more: str, less: str) -> str:
    """'3.1x faster' for 3.1, '1.3x slower' for 0.77 (`more`/`less` name the two directions)."""
    if ratio >= 1:
        return f"{ratio:.1f}x {more}"
    return f"{1 / ratio:.1f}x {less}"


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Student against teacher: speedup (teacher p50 / student p50), size ratio (teacher / student
    parameters), FLOPs ratio, accuracy difference in points (None without a teacher accuracy) and
    the headline sentence. None when either row lacks a latency."""
    t, s = rows.get("teacher") or {}, rows.get("student") or {}
    t_lat, s_lat = (t.get("latency_ms") or {}).get("p50"), (s.get("latency_ms") or {}).get("p50")
    if not t_lat or not s_lat or not t.get("params") or not s.get("params"):
        return None
    speedup = t_lat / s_lat
    size = t["params"] / s["params"]
    points = None
    if t.get("accuracy") is not None and s.get("accuracy") is not None:
        points = round(100 * (s["accuracy"] - t["accuracy"]), 4)
    headline = (
        f"student {ratio_text(speedup, 'faster', 'slower')} and {ratio_text(size, 'smaller', 'larger')} "
        f"than the teacher"
    )
    headline += f", {points:+.1f} points" if points is not None else " (no teacher accuracy to compare)"
    return {
        "speedup": round(speedup, 4),
        "size_ratio": round(size, 4),
        "flops_ratio": round(t["flops"] / s["flops"], 4) if t.get("flops") and s.get("flops") else None,
        "points": points,
        "headline": headline,
    }


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info(threads: int = LATENCY_THREADS) -> dict[str, Any]:
    """How the CPU latencies were taken: threads, batch, runs, onnxruntime version, processor."""
    import onnxruntime as ort

    return {
        "runtime": f"onnxruntime {ort.__version__}",
        "provider": "CPUExecutionProvider",
        "threads": threads,
        "batch": 1,
        "warmup_runs": WARMUP_RUNS,
        "max_runs": LATENCY_RUNS,
        "processor": _processor(),
        "cores": os.cpu_count(),
    }


# ------------------------------------------------------------------------------ a job
def measure_job(run: Run, out: Path, models: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """`metrics.json`'s `deploy` block for a job whose export stage has written the hub folders and
    `student.onnx` into `out`. `models`: `teacher`, `student` (the shipped one) and, when it is not
    the student, `baseline`. Writes `student.int8.onnx` unless `export.int8` is off; reports the
    headline as an `info` event and an unusable int8 model as a `warning` event. Measurement-only
    ONNX files live in a dot-folder of `out` removed on return (never published)."""
    spec, results = run.spec, run.state.results
    size = run.data.image_size
    sizes = {"teacher": run.data.teacher_image_size}  # the teacher is measured at its own size
    shipped = results["shipped"]["student"]
    accuracy = {
        "teacher": (results.get("teacher") or {}).get("report_acc"),
        "student": results[shipped]["report_acc"],
        "baseline": (results.get("baseline") or {}).get("report_acc"),
    }
    names = {"teacher": spec.teacher.model, "student": spec.student.model, "baseline": spec.student.model}
    folders = {"teacher": "teacher", "student": "student", "baseline": "baseline"}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=".deploy-", dir=out) as tmp:
        onnx_files = {"student": out / STUDENT_ONNX}
        for role, model in models.items():
            row: dict[str, Any] = {
                "model": names[role],
                "accuracy": accuracy[role],
                "params": param_count(model),
                "flops": count_flops(model, sizes.get(role, size)),
                "image_size": sizes.get(role, size),
            }
            row["macs"] = row["flops"] // 2
            weights = out / folders[role] / WEIGHTS_FILE
            row["weights_file"] = f"{folders[role]}/{WEIGHTS_FILE}"
            row["weights_bytes"] = weights.stat().st_size
            row["onnx_file"] = STUDENT_ONNX if role == "student" else None  # others: measured only
            if role != "student" and not _export_for_measuring(
                run, model, sizes.get(role, size), Path(tmp) / f"{role}.onnx"
            ):
                row["onnx_bytes"] = None  # no latency either; the job goes on
                rows[role] = row
                continue
            if role != "student":
                onnx_files[role] = Path(tmp) / f"{role}.onnx"
            row["onnx_bytes"] = onnx_files[role].stat().st_size
            rows[role] = row
        rows["student"]["trained"] = shipped
        if "baseline" in results and "baseline" not in models:
            rows["baseline"] = {"same_as": "student"}  # the baseline is what shipped
        int8 = _int8(run, out) if spec.export.int8 else None
        if int8 is not None and "error" not in int8:
            onnx_files["student_int8"] = out / INT8_FILE
        latency = cpu_latency(onnx_files, size, sizes=sizes)
    for role, row in rows.items():
        if role in latency:
            row["latency_ms"] = latency[role]
    if int8 is not None and "student_int8" in latency:
        int8["latency_ms"] = latency["student_int8"]
        int8["speedup_vs_fp32"] = round(latency["student"]["p50"] / latency["student_int8"]["p50"], 4)
    gpu = None
    if run.runtime.is_cuda:
        batch = spec.train.batch_size
        gpu = {"device": str(run.runtime.device), "batch": batch, "precision": _precision(run.runtime)}
        try:
            throughput = gpu_throughput(models, size, batch, run.runtime, sizes=sizes)
        except torch.cuda.OutOfMemoryError as exc:  # a measurement, not a reason to fail the job
            torch.cuda.empty_cache()
            gpu["error"] = f"out of GPU memory at batch {batch}: {str(exc)[:200]}"
            run.reporter.event("warning", f"no GPU throughput measured: {gpu['error']}")
            throughput = {}
        for role, value in throughput.items():
            rows[role]["gpu_images_per_s"] = value
    block = {
        "image_size": size,
        "teacher_image_size": sizes["teacher"],
        "flops_counter": FLOPS_COUNTER,
        "cpu": cpu_info(),
        "gpu": gpu,
        "models": rows,
        "student_vs_teacher": summarise(rows),
        "int8": int8,
    }
    for kind, message, data in events(block):
        run.reporter.event(kind, message, **data)
    return block


def events(block: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The events a deploy block is announced with: the headline (`info`), and a `warning` that says
    not to use an int8 model that lost more than allowed (a failed quantisation warned already)."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    summary = block.get("student_vs_teacher")
    if summary:
        out.append(("info", summary["headline"], dict(summary)))
    int8 = block.get("int8")
    if isinstance(int8, dict) and int8.get("usable") is False and "error" not in int8:
        out.append(
            ("warning", int8_warning(int8), {"file": int8["file"], "drop_points": int8["drop_points"]})
        )
    return out


def _export_for_measuring(run: Run, model: torch.nn.Module, size: int, path: Path) -> bool:
    """Export a model that is only measured (the teacher, the baseline) to ONNX; False, with an
    `info` event, when neither exporter can (the row then has no ONNX size or latency). A full
    disk still fails the job, as for the shipped student's export."""
    try:
        export.export_onnx(model, size, path)
        return True
    except Exception as exc:  # noqa: BLE001 - a model the exporters cannot translate: not measured
        if storage_full(exc) is not None:
            raise
        run.reporter.event(
            "info",
            f"{path.stem}: no ONNX latency measured, the export failed ({type(exc).__name__}: {exc})"[:500],
        )
        return False


def _precision(runtime: Runtime) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(runtime.amp_dtype, "fp32")  # type: ignore[arg-type]


def _int8(run: Run, out: Path) -> dict[str, Any]:
    """int8_block for a job: calibration on a seeded sample of training images through the eval
    transform, the report split as evaluation serves it. A failure is a `warning` event and an
    `error` entry: the fp32 model still ships."""
    from spkd.models.data import loader

    spec, data = run.spec, run.data
    cfg = data.student_cfg
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)

    def norm(images: torch.Tensor) -> np.ndarray:
        return loader.normalize_batch(images.to("cpu"), mean, std).numpy()

    picks = random.Random(spec.train.seed).sample(
        run.scan.train, min(CALIBRATION_IMAGES, len(run.scan.train))
    )
    calib_set = loader.ImageDataset(picks, data.report_set.transform)  # the eval transform

    def calibration() -> Iterator[np.ndarray]:
        for start in range(0, len(calib_set), CALIBRATION_BATCH):
            items = [calib_set[i][0] for i in range(start, min(len(calib_set), start + CALIBRATION_BATCH))]
            yield norm(torch.stack(items))

    def report() -> Iterator[tuple[np.ndarray, list[int]]]:
        for images, labels, _ in data.eval_batches("report")():
            yield norm(images), [int(v) for v in labels]

    try:
        block = int8_block(
            out / STUDENT_ONNX,
            out / INT8_FILE,
            calibration(),
            report,
            list(run.scan.classes),
            spec.export.int8_max_drop,
            spec.train.seed,
        )
    except Exception as exc:  # noqa: BLE001 - int8 is an extra: the job ships its fp32 models anyway
        if storage_full(exc) is not None:  # the fp32 artifacts would not fit either: fail as the export does
            raise
        (out / INT8_FILE).unlink(missing_ok=True)
        message = f"no {INT8_FILE}: onnxruntime's quantisation failed ({type(exc).__name__}: {exc})"[:500]
        run.reporter.event("warning", message)
        return {"error": message, "usable": False}
    block["calibration"] = {
        "images": len(picks),
        "seed": spec.train.seed,
        "split": "train",
        "method": "MinMax",
        "format": "QDQ",
        "weights": "int8, per channel",
        "activations": "uint8",
    }
    block["headline"] = _int8_headline(block)
    return block


def _int8_headline(block: dict[str, Any]) -> str:
    gain = 0.0 - block["drop_points"] + 0.0  # never "-0.0"
    text = f"int8 student: {100 * block['accuracy']:.1f}% ({gain:+.1f} points vs fp32)"
    return text + ("" if block["usable"] else f"; {int8_warning(block)}")
