"""The engine's entry points: validate a job, then run its stages with checkpoints and artifacts.

Stages, in order, each optional by spec: teacher_finetune (teacher.finetune set), baseline
(baseline: true), distill, evaluate, export. A run resumes from out_dir/checkpoints/last.pt.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import checkpoint, data, export, factory, fastpath, guards, validation, weights
from models.callbacks import Reporter
from models.engine import (
    Clock,
    LiveTeacher,
    Normalizer,
    Runtime,
    StagePlan,
    StageResume,
    evaluate,
    freeze,
    pick_runtime,
    prepare,
    train_stage,
)
from models.errors import SpkdError
from models.factory import DataConfig
from models.features import AUTO, FeatureTap, check_layers
from models.losses import Distiller
from models.report import write_report
from models.spec import JobSpec

TRAINING_STAGES = ("teacher_finetune", "baseline", "distill")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------- validation
def layer_pairs(spec: JobSpec) -> tuple[list[str], list[str], list[float]]:
    """(teacher layers, student layers, weights) for SP."""
    if spec.distill.layers == AUTO:
        return [AUTO], [AUTO], [1.0]
    pairs = spec.distill.layers
    return [p.teacher for p in pairs], [p.student for p in pairs], [p.weight for p in pairs]


def planned_stages(spec: JobSpec) -> list[str]:
    stages = ["teacher_finetune"] if spec.teacher.finetune else []
    if spec.baseline:
        stages.append("baseline")
    return stages + ["distill", "evaluate", "export"]


def validate_job(spec: JobSpec, data_dir: Path) -> list[str]:
    """Check everything a person must fix before any training; returns warnings, raises SpkdError.

    Both models are built at the job's image size and run once on it (models/validation.py);
    a second call for the same spec, data and weight files returns the first call's warnings.
    """
    if (cached := validation.cached(spec, data_dir)) is not None:
        return cached
    factory.check_model_name(spec.teacher.model, "teacher.model")
    factory.check_model_name(spec.student.model, "student.model")
    scan = data.scan_dataset(Path(data_dir), spec.dataset.val_fraction, spec.train.seed)
    guards.check_batch_size(spec.train.batch_size, len(scan.train))
    finetuned = spec.teacher.finetune is not None
    found = validation.check_reused_heads(spec.teacher.weights, spec.student.weights, finetuned, scan.classes)
    n = len(scan.classes)
    size = job_image_size(spec)
    teacher, teacher_head = _validate_model(
        "teacher", spec.teacher.model, spec.teacher.weights, scan.classes, size
    )
    student, _ = _validate_model("student", spec.student.model, spec.student.weights, scan.classes, size)
    t_layers, s_layers, _ = layer_pairs(spec)
    check_layers(teacher, t_layers, "distill.layers.teacher")
    check_layers(student, s_layers, "distill.layers.student")
    validation.probe_model("teacher", spec.teacher.model, teacher, t_layers, size, n)
    validation.probe_model("student", spec.student.model, student, s_layers, size, n)
    if note := validation.unnamed_head_warning(spec.teacher.weights, teacher_head, finetuned):
        found.append(note)
    if spec.teacher.finetune is None and not teacher_head:
        if spec.distill.kd_weight > 0:
            raise SpkdError(
                "teacher_not_finetuned",
                "KD needs a teacher whose head knows the target classes: "
                "set teacher.finetune or load fine-tuned teacher weights",
                "distill.kd_weight",
            )
        found.append(
            "the teacher is not fine-tuned and its weights have no head for these classes: "
            "SP uses its ImageNet features and no teacher accuracy is reported"
        )
    if factory.param_count(student) > factory.param_count(teacher):
        found.append(f"the student ({spec.student.model}) is larger than the teacher ({spec.teacher.model})")
    for role, name, w in (
        ("teacher", spec.teacher.model, spec.teacher.weights),
        ("student", spec.student.model, spec.student.weights),
    ):
        if w == "package" and not name.startswith("tf_"):
            found.append(f"{role}: the package weights fit tf_{name} best (TF 'same' padding)")
    if len(scan.rejected):
        found.append(f"{len(scan.rejected)} file(s) in the dataset were skipped: see the dataset report")
    return validation.remember(spec, data_dir, found)


def job_image_size(spec: JobSpec) -> int:
    """One image size per job: train.image_size, else the student's pretrained input size."""
    if spec.train.image_size:
        return spec.train.image_size
    import timm.models

    cfg = timm.models.get_pretrained_cfg(spec.student.model)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def _validate_model(
    role: str, name: str, w: str, classes: list[str], size: int
) -> tuple[torch.nn.Module, bool]:
    """Build the model (no download) and load file/package weights, catching misfits now."""
    if w == "hub":
        if not weights.has_hub_weights(name):
            raise SpkdError(
                "no_pretrained_weights", f"timm has no pretrained weights for {name!r}", f"{role}.weights"
            )
        return factory.create(name, len(classes), field=f"{role}.model", image_size=size), False
    return weights.build(name, w, len(classes), role, size, classes)


# ------------------------------------------------------------------------------------ running
@dataclass
class RunState:
    """What survives a restart: finished stages, their results, and the stage in progress."""

    spec: str
    completed: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    current: dict[str, Any] | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "spec": self.spec,
            "completed": self.completed,
            "results": self.results,
            "curves": self.curves,
            "timing": self.timing,
            "current": self.current,
        }


@dataclass
class Run:
    spec: JobSpec
    scan: data.DatasetScan
    out_dir: Path
    reporter: Reporter
    runtime: Runtime
    state: RunState
    image_size: int
    student_cfg: DataConfig
    teacher_cfg: DataConfig
    train_set: data.ImageDataset
    val_set: data.ImageDataset
    clock: Clock
    fast: fastpath.FastPath | None = None  # in-memory data path + teacher cache (issue 6)

    @property
    def num_classes(self) -> int:
        return len(self.scan.classes)

    def save(self) -> None:
        checkpoint.save(self.out_dir, self.state.payload())

    def ckpt_file(self, name: str) -> Path:
        return checkpoint.checkpoint_dir(self.out_dir) / name


def run_job(
    spec: JobSpec, data_dir: Path, out_dir: Path, reporter: Reporter, device: str | None = None
) -> dict:
    """Run (or resume) the job; returns the metrics dict also written to out_dir/metrics.json."""
    out_dir = Path(out_dir)
    for warning in validate_job(spec, data_dir):
        reporter.event("warning", warning)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _setup(spec, Path(data_dir), out_dir, reporter, device)
    stage_fns = {
        "teacher_finetune": _teacher_finetune,
        "baseline": _baseline,
        "distill": _distill,
        "evaluate": _evaluate,
        "export": _export,
    }
    for stage in planned_stages(spec):
        if stage in run.state.completed:
            continue
        reporter.event("stage_started", f"{stage} started", stage=stage)
        start = time.perf_counter()
        val_acc = stage_fns[stage](run)
        seconds = (
            run.state.timing.get(stage, 0.0) if stage in TRAINING_STAGES else time.perf_counter() - start
        )
        run.state.timing[stage] = round(seconds, 3)
        run.state.completed.append(stage)
        run.state.current = None
        run.save()
        finished = {"stage": stage, "seconds": round(seconds, 3)}
        if val_acc is not None:
            finished["val_acc"] = val_acc
        reporter.event("stage_finished", f"{stage} finished in {seconds:.1f}s", **finished)
        if run.runtime.is_cuda:
            torch.cuda.empty_cache()
    _cleanup_checkpoints(run)
    return json.loads((out_dir / "metrics.json").read_text())


def _setup(spec: JobSpec, data_dir: Path, out_dir: Path, reporter: Reporter, device: str | None) -> Run:
    scan = data.scan_dataset(data_dir, spec.dataset.val_fraction, spec.train.seed)
    summary = scan.summary()
    reporter.event(
        "dataset",
        f"{len(scan.classes)} classes, {len(scan.train)} train / {len(scan.val)} val "
        f"images, {len(scan.rejected)} rejected",
        classes=summary["classes"],
        counts=summary["counts"],
        rejected=summary["rejected"],
    )
    runtime = pick_runtime(spec.train.precision, device)
    if note := validation.precision_note(spec.train.precision, runtime.amp_dtype, runtime.device):
        reporter.event("warning", note, requested=spec.train.precision, device=str(runtime.device))
    # data configs come from freshly built (weightless) models: cheap, and the same as pretrained
    image_size = job_image_size(spec)
    probe_s = factory.create(spec.student.model, len(scan.classes), image_size=image_size)
    probe_t = factory.create(spec.teacher.model, len(scan.classes), image_size=image_size)
    student_cfg = factory.data_config(probe_s, image_size)
    teacher_cfg = factory.data_config(probe_t, image_size)
    train_set = data.ImageDataset(scan.train, data.make_transform(image_size, student_cfg, training=True))
    val_set = data.ImageDataset(scan.val, data.make_transform(image_size, student_cfg, training=False))
    state = _load_state(spec, out_dir, reporter)
    steps = _steps_per_epoch(len(train_set), spec.train.batch_size)
    epochs = {
        "teacher_finetune": spec.teacher.finetune.epochs if spec.teacher.finetune else 0,
        "baseline": spec.train.epochs if spec.baseline else 0,
        "distill": spec.train.epochs,
    }
    clock = Clock(total_steps=sum(e * steps for s, e in epochs.items() if s not in state.completed))
    return Run(
        spec=spec,
        scan=scan,
        out_dir=out_dir,
        reporter=reporter,
        runtime=runtime,
        state=state,
        image_size=image_size,
        student_cfg=student_cfg,
        teacher_cfg=teacher_cfg,
        train_set=train_set,
        val_set=val_set,
        clock=clock,
        fast=fastpath.FastPath(
            spec, scan, runtime.device, image_size, val_set.transform, reporter, runtime.amp_dtype
        ),
    )


def _spec_key(spec: JobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def _load_state(spec: JobSpec, out_dir: Path, reporter: Reporter) -> RunState:
    saved = checkpoint.load(out_dir)
    key = _spec_key(spec)
    if saved is None:
        return RunState(spec=key)
    if saved.get("version") != FORMAT_VERSION or saved.get("spec") != key:
        reporter.event(
            "warning", "a checkpoint for another job spec was found in the output folder; starting over"
        )
        return RunState(spec=key)
    state = RunState(
        spec=key,
        completed=list(saved["completed"]),
        results=dict(saved["results"]),
        curves=dict(saved["curves"]),
        timing=dict(saved["timing"]),
        current=saved["current"],
    )
    where = state.current and f"{state.current['stage']} epoch {state.current['epoch']}"
    reporter.event(
        "info",
        f"resuming from checkpoint ({where or 'after ' + ', '.join(state.completed)})",
        completed=state.completed,
    )
    return state


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size if n >= batch_size else math.ceil(n / batch_size)


# ------------------------------------------------------------------------------------- stages
def _loaders(run: Run, stage: str | None = None):
    fast = run.fast.loaders(stage) if run.fast is not None else None
    if fast is not None:  # decoded once, augmented on the device (models/fastpath.py)
        return fast
    spec, pin = run.spec, run.runtime.is_cuda
    workers = data.default_workers(spec.train.num_workers)

    def train_batches(epoch: int):
        return data.make_loader(
            run.train_set,
            spec.train.batch_size,
            training=True,
            seed=spec.train.seed,
            epoch=epoch,
            num_workers=workers,
            pin_memory=pin,
        )

    def val_batches():
        return data.make_loader(
            run.val_set,
            spec.train.batch_size,
            training=False,
            seed=spec.train.seed,
            epoch=0,
            num_workers=workers,
            pin_memory=pin,
        )

    return train_batches, val_batches


def _build_student(run: Run) -> torch.nn.Module:
    checkpoint.seed_everything(run.spec.train.seed, "init", "student")  # same new head for baseline and SP
    model, _ = weights.build(
        run.spec.student.model,
        run.spec.student.weights,
        run.num_classes,
        "student",
        run.image_size,
        run.scan.classes,
    )
    return prepare(model, run.runtime)


def _build_teacher(run: Run) -> tuple[torch.nn.Module, bool]:
    """The teacher as the later stages use it: fine-tuned weights when that stage has run."""
    checkpoint.seed_everything(run.spec.train.seed, "init", "teacher")
    model, head = weights.build(
        run.spec.teacher.model,
        run.spec.teacher.weights,
        run.num_classes,
        "teacher",
        run.image_size,
        run.scan.classes,
    )
    finetuned = run.ckpt_file("teacher.safetensors")
    if "teacher_finetune" in run.state.completed and finetuned.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(finetuned)))
        head = True
    return prepare(model, run.runtime), head


def _train(
    run: Run, stage: str, model: torch.nn.Module, distiller: Distiller, epochs: int, lr: float
) -> float:
    """Run one training stage with resume and checkpoints; returns the final val accuracy."""
    train_batches, val_batches = _loaders(run, stage)
    current = run.state.current
    resume = None
    if current and current["stage"] == stage:
        checkpoint.set_rng_state(current["rng"])
        resume = StageResume(
            epoch=current["epoch"],
            model=current["model"],
            optimizer=current["optimizer"],
            scheduler=current["scheduler"],
            rng=current["rng"],
            curve=list(current["curve"]),
            seconds=current["seconds"],
        )

    def on_epoch_end(payload: dict[str, Any]) -> None:
        run.state.current = {"stage": stage, **payload}
        run.state.curves[stage] = payload["curve"]
        run.state.timing[stage] = round(payload["seconds"], 3)
        run.save()
        run.reporter.event(
            "checkpoint",
            f"checkpoint after {stage} epoch {payload['epoch']}",
            stage=stage,
            epoch=payload["epoch"],
        )

    plan = StagePlan(
        name=stage,
        model=model,
        distiller=distiller,
        student_norm=Normalizer(_cfg_for(run, stage), run.runtime, model),
        epochs=epochs,
        lr=lr,
        weight_decay=run.spec.train.weight_decay,
        seed=run.spec.train.seed,
        train_batches=train_batches,
        val_batches=val_batches,
        steps_per_epoch=_steps_per_epoch(len(run.train_set), run.spec.train.batch_size),
    )
    curve, _ = train_stage(plan, run.runtime, run.reporter, run.clock, on_epoch_end, resume)
    return curve[-1]["val_acc"]


def _cfg_for(run: Run, stage: str) -> DataConfig:
    return run.teacher_cfg if stage == "teacher_finetune" else run.student_cfg


def _plain(model: torch.nn.Module) -> Distiller:
    return Distiller(FeatureTap(model, [AUTO]), None, [1.0], 0.0, 0.0, 1.0)


def _teacher_finetune(run: Run) -> float:
    teacher, _ = _build_teacher(run)
    ft = run.spec.teacher.finetune
    acc = _train(run, "teacher_finetune", teacher, _plain(teacher), ft.epochs, ft.lr or run.spec.train.lr)
    export.save_weights(teacher, run.ckpt_file("teacher.safetensors"))
    run.state.results["teacher"] = {"val_acc": acc}
    return acc


def _baseline(run: Run) -> float:
    student = _build_student(run)
    acc = _train(run, "baseline", student, _plain(student), run.spec.train.epochs, run.spec.train.lr)
    run.state.results["baseline"] = {"val_acc": acc}
    return acc


def _distill(run: Run) -> float:
    spec = run.spec
    t_layers, s_layers, layer_weights = layer_pairs(spec)
    student = _build_student(run)
    teacher_fn = None
    if spec.distill.sp_weight > 0 or spec.distill.kd_weight > 0:
        teacher, _ = _build_teacher(run)
        freeze(teacher)
        teacher_fn = make_teacher(run, teacher, t_layers)
    distiller = Distiller(
        FeatureTap(student, s_layers, "distill.layers.student"),
        teacher_fn,
        layer_weights,
        spec.distill.sp_weight,
        spec.distill.kd_weight,
        spec.distill.temperature,
    )
    acc = _train(run, "distill", student, distiller, spec.train.epochs, spec.train.lr)
    export.save_weights(student, run.ckpt_file("student.safetensors"))
    run.state.results["distilled"] = {"val_acc": acc}
    return acc


def make_teacher(run: Run, teacher: torch.nn.Module, layers: list[str]) -> LiveTeacher:
    """The one place the distill stage gets teacher outputs from (a feature cache can plug in here)."""
    live = LiveTeacher(
        FeatureTap(teacher, layers, "distill.layers.teacher"),
        Normalizer(run.teacher_cfg, run.runtime, teacher),
        run.runtime,
    )
    return run.fast.teacher(live) if run.fast is not None else live


def _final_student(run: Run) -> torch.nn.Module:
    from safetensors.torch import load_file

    model, _ = weights.build(run.spec.student.model, "none", run.num_classes, "student", run.image_size)
    model.load_state_dict(load_file(str(run.ckpt_file("student.safetensors"))))
    return prepare(model, run.runtime)


def _evaluate(run: Run) -> float:
    _, val_batches = _loaders(run)
    student = _final_student(run)
    result = evaluate(
        student,
        Normalizer(run.student_cfg, run.runtime, student),
        val_batches(),
        run.runtime,
        run.num_classes,
    )
    guards.check_value(result["loss"], "evaluate", None, "val_loss")
    run.state.results["distilled"] = {
        "val_acc": result["acc"],
        "val_loss": result["loss"],
        "per_class_acc": dict(zip(run.scan.classes, result["per_class_acc"], strict=True)),
    }
    teacher, head = _build_teacher(run)
    if head:
        t = evaluate(teacher, Normalizer(run.teacher_cfg, run.runtime, teacher), val_batches(), run.runtime)
        guards.check_value(t["loss"], "evaluate", None, "teacher_val_loss")
        run.state.results["teacher"] = {"val_acc": t["acc"], "val_loss": t["loss"]}
    else:
        run.state.results.setdefault("teacher", {"val_acc": None})
    return result["acc"]


def _export(run: Run) -> None:
    start = time.perf_counter()
    out, spec, results = run.out_dir, run.spec, run.state.results
    student = _final_student(run)
    teacher, _ = _build_teacher(run)
    guards.require_finite_weights(student, "distilled student")  # never export NaN weights
    guards.require_finite_weights(teacher, "teacher")
    export.save_weights(student, out / "student.safetensors")
    export.write_json(
        out / "student.json",
        export.model_card(
            spec.student.model, run.scan.classes, run.student_cfg, val_acc=results["distilled"]["val_acc"]
        ),
    )
    export.save_weights(teacher, out / "teacher.safetensors")
    export.write_json(
        out / "teacher.json",
        export.model_card(
            spec.teacher.model,
            run.scan.classes,
            run.teacher_cfg,
            val_acc=results.get("teacher", {}).get("val_acc"),
        ),
    )
    exporter = export.export_onnx(student, run.image_size, out / "student.onnx")
    run.reporter.event("info", f"exported student.onnx ({exporter} exporter)")
    run.state.timing["export"] = round(time.perf_counter() - start, 3)
    metrics = build_metrics(run)
    export.write_json(out / "metrics.json", metrics)
    write_report(out)  # report.html + curves.png from metrics.json (issue 7)


def build_metrics(run: Run) -> dict[str, Any]:
    results = run.state.results
    baseline = results.get("baseline")
    distilled = results["distilled"]
    gain = distilled["val_acc"] - baseline["val_acc"] if baseline else None
    return {
        "teacher": results.get("teacher", {"val_acc": None}),
        "baseline": baseline,
        "distilled": distilled,
        "gain": gain,
        "curves": run.state.curves,
        "dataset": run.scan.summary(),
        "timing": run.state.timing,
        "spec": run.spec.model_dump(mode="json"),
        "device": _device_name(run.runtime),
        "image_size": run.image_size,
    }


def _device_name(runtime: Runtime) -> str:
    if runtime.is_cuda:
        return f"{runtime.device} ({torch.cuda.get_device_name(runtime.device)})"
    return str(runtime.device)


def _cleanup_checkpoints(run: Run) -> None:
    """After success keep only the small state file (a rerun returns at once); drop big weights."""
    for name in ("teacher.safetensors", "student.safetensors"):
        path = run.ckpt_file(name)
        if path.exists():
            path.unlink()
