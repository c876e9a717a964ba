"""The engine's entry points: validate a job, then run its stages with checkpoints and artifacts.

Stages, in order, each optional by spec: teacher_finetune (teacher.finetune set), baseline
(baseline: true), distill, evaluate, export. A run resumes from its last checkpoint
(models/checkpoint.py: out_dir/checkpoints/, one folder per attempt of a service job).

Publishing: every file a run leaves is written to a temporary name first and moved into place
only after `ensure_current(reporter)` (the service's fencing check) passes, right before the
rename. Checkpoints and stage weights go to the attempt's own folder; the artifacts are staged in
that folder too and moved into out_dir together at the end of the export stage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import (
    autoweight,
    checkpoint,
    data,
    export,
    factory,
    fastpath,
    guards,
    methods,
    stats,
    validation,
    weights,
)
from models.callbacks import Reporter, StopRequested, ensure_current
from models.engine import (
    Clock,
    LiveTeacher,
    Normalizer,
    Runtime,
    StagePlan,
    StageResume,
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
from models.spec import AUTO_WEIGHT, JobSpec

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
        if spec.distill.kd_on:
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
    val_set: data.ImageDataset  # the report split
    clock: Clock
    fast: fastpath.FastPath | None = None  # in-memory data path + teacher cache
    select_set: data.ImageDataset | None = None  # the selection split; None: selection off
    attempt: int | None = None  # the service's fencing token: names this attempt's folder

    @property
    def num_classes(self) -> int:
        return len(self.scan.classes)

    @property
    def selecting(self) -> bool:
        """Whether choices (best epoch, weights, shipped student) are made on a selection split."""
        return self.select_set is not None

    def guard(self) -> None:
        """Raise Fenced unless this run may still write (called right before each rename)."""
        ensure_current(self.reporter)

    def save(self) -> None:
        checkpoint.save(self.out_dir, self.state.payload(), self.attempt, self.guard)

    def ckpt_file(self, name: str) -> Path:
        return checkpoint.checkpoint_dir(self.out_dir, self.attempt) / name

    def save_stage_weights(self, model: torch.nn.Module, name: str) -> None:
        export.save_weights(model, self.ckpt_file(name), self.guard)

    @property
    def staging_dir(self) -> Path:
        """Where the export stage writes the artifacts before they are published into out_dir."""
        return checkpoint.checkpoint_dir(self.out_dir, self.attempt) / "export"


def run_job(
    spec: JobSpec,
    data_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: str | None = None,
    attempt: int | None = None,
) -> dict:
    """Run (or resume) the job; returns the metrics dict also written to out_dir/metrics.json.

    `attempt`: a number that grows with every attempt at the same job (the service passes its
    fencing token). Each attempt keeps its checkpoints in its own folder and starts from the
    newest earlier one. Raises whatever the reporter raises (StopRequested, Fenced) unchanged.
    """
    out_dir = Path(out_dir)
    for warning in validate_job(spec, data_dir):
        reporter.event("warning", warning)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _setup(spec, Path(data_dir), out_dir, reporter, device, attempt)
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
        if reporter.should_stop():  # evaluate and export have no training steps that check it
            raise StopRequested()
        reporter.event("stage_started", f"{stage} started", stage=stage)
        start = time.perf_counter()
        val_acc = stage_fns[stage](run)  # training stages: the best epoch's selection accuracy
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
            finished["eval_split"] = _choice_split(run) if stage in TRAINING_STAGES else "report"
        reporter.event("stage_finished", f"{stage} finished in {seconds:.1f}s", **finished)
        if run.runtime.is_cuda:
            torch.cuda.empty_cache()
    _cleanup_checkpoints(run)
    return json.loads((out_dir / "metrics.json").read_text())


def _setup(
    spec: JobSpec, data_dir: Path, out_dir: Path, reporter: Reporter, device: str | None, attempt: int | None
) -> Run:
    scan = data.scan_dataset(data_dir, spec.dataset.val_fraction, spec.train.seed)
    scan = data.with_selection(scan, spec.dataset.selection_fraction, spec.train.seed)
    if isinstance(spec.distill.sp_weight, list) and not scan.select:
        raise SpkdError(
            "search_needs_selection",
            "a list of sp_weight candidates is judged on a selection split: set dataset.selection_fraction "
            "above 0 (or give the dataset a test/ split, so val/ selects)",
            "distill.sp_weight",
        )
    summary = scan.summary()
    sizes, roles = summary["sizes"], summary["roles"]
    reporter.event(
        "dataset",
        f"{len(scan.classes)} classes, {sizes['train']} train / {sizes['selection']} selection "
        f"({roles['selection']}) / {sizes['report']} report ({roles['report']}) images, "
        f"{len(scan.rejected)} rejected",
        classes=summary["classes"],
        counts=summary["counts"],
        rejected=summary["rejected"],
        sizes=sizes,
        roles=roles,
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
    eval_transform = data.make_transform(image_size, student_cfg, training=False)
    val_set = data.ImageDataset(scan.val, eval_transform)
    select_set = data.ImageDataset(scan.select, eval_transform) if scan.select else None
    checkpoint.adopt(out_dir, attempt)
    state = _load_state(spec, out_dir, reporter, attempt)
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
        select_set=select_set,
        clock=clock,
        fast=fastpath.FastPath(
            spec, scan, runtime.device, image_size, val_set.transform, reporter, runtime.amp_dtype
        ),
        attempt=attempt,
    )


def _spec_key(spec: JobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def _load_state(spec: JobSpec, out_dir: Path, reporter: Reporter, attempt: int | None) -> RunState:
    saved = checkpoint.load(out_dir, attempt)
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
def _loader(run: Run, dataset: data.ImageDataset, training: bool, epoch: int = 0):
    spec = run.spec
    return data.make_loader(
        dataset,
        spec.train.batch_size,
        training=training,
        seed=spec.train.seed,
        epoch=epoch,
        num_workers=data.default_workers(spec.train.num_workers),
        pin_memory=run.runtime.is_cuda,
    )


def _eval_batches(run: Run, split: str):
    """() -> batches of the `selection` or `report` split (eval transform, fixed order)."""
    fast = run.fast.eval_batches(split) if run.fast is not None else None
    if fast is not None:
        return fast
    dataset = run.select_set if split == "selection" and run.select_set is not None else run.val_set
    return lambda: _loader(run, dataset, training=False)


def _choice_split(run: Run) -> str:
    """The split every epoch is evaluated on: selection, or the report split when selection is off."""
    return "selection" if run.selecting else "report"


def _loaders(run: Run, stage: str | None = None):
    fast = run.fast.loaders(stage) if run.fast is not None else None
    train_batches = fast[0] if fast is not None else None  # decoded once, augmented on the device
    if train_batches is None:

        def train_batches(epoch: int):
            return _loader(run, run.train_set, training=True, epoch=epoch)

    return train_batches, _eval_batches(run, _choice_split(run))


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
        _load(model, finetuned)
        head = True
    return prepare(model, run.runtime), head


def _load(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


def _best_file(run: Run, stage: str) -> Path:
    return run.ckpt_file(f"{stage}.best.safetensors")


def best_row(curve: list[dict]) -> dict:
    """The epoch with the highest selection accuracy; ties go to the later epoch."""
    return max(curve, key=lambda r: (r["val_acc"], r["epoch"]))


def _train(
    run: Run,
    stage: str,
    model: torch.nn.Module,
    distiller: Distiller,
    epochs: int,
    lr: float,
    on_epoch=None,
) -> dict[str, Any]:
    """Run one training stage with resume and checkpoints; leave `model` at its best epoch.

    With a selection split every epoch is scored on it and the best epoch's weights (ties: the later
    epoch) are kept in checkpoints/<stage>.best.safetensors before the epoch's checkpoint is saved,
    so a resumed run chooses exactly as an uninterrupted one. Without one the last epoch is kept.
    Returns {"best_epoch", "select_acc" (None without selection), "epochs"}.
    """
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
            methods=current.get("methods"),
        )

    def on_epoch_end(payload: dict[str, Any]) -> None:
        curve = payload["curve"]
        if run.selecting and best_row(curve) is curve[-1]:
            export.save_weights(model, _best_file(run, stage), run.guard)
        if on_epoch is not None:
            on_epoch(payload)
        run.state.current = {"stage": stage, **payload}
        run.state.curves[stage] = curve
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
        eval_split=_choice_split(run),
    )
    curve, _ = train_stage(plan, run.runtime, run.reporter, run.clock, on_epoch_end, resume)
    if not run.selecting:
        return {"best_epoch": curve[-1]["epoch"], "select_acc": None, "epochs": epochs}
    best = best_row(curve)
    _load(model, _best_file(run, stage))
    run.reporter.event(
        "best_epoch",
        f"{stage}: keeping epoch {best['epoch']} of {epochs} "
        f"(selection accuracy {100 * best['val_acc']:.1f}%)",
        stage=stage,
        epoch=best["epoch"],
        select_acc=best["val_acc"],
    )
    return {"best_epoch": best["epoch"], "select_acc": best["val_acc"], "epochs": epochs}


def _cfg_for(run: Run, stage: str) -> DataConfig:
    return run.teacher_cfg if stage == "teacher_finetune" else run.student_cfg


def _plain(model: torch.nn.Module) -> Distiller:
    return Distiller(FeatureTap(model, [AUTO]), None, [1.0], 0.0, 0.0, 1.0)


def _teacher_finetune(run: Run) -> float | None:
    teacher, _ = _build_teacher(run)
    ft = run.spec.teacher.finetune
    chosen = _train(run, "teacher_finetune", teacher, _plain(teacher), ft.epochs, ft.lr or run.spec.train.lr)
    run.save_stage_weights(teacher, "teacher.safetensors")
    run.state.results["teacher"] = chosen
    return chosen["select_acc"]


def _baseline(run: Run) -> float | None:
    student = _build_student(run)
    chosen = _train(run, "baseline", student, _plain(student), run.spec.train.epochs, run.spec.train.lr)
    run.save_stage_weights(student, "baseline.safetensors")
    run.state.results["baseline"] = chosen
    return chosen["select_acc"]


def _distill(run: Run) -> float | None:
    spec = run.spec
    t_layers, s_layers, layer_weights = layer_pairs(spec)
    student = _build_student(run)
    ms = methods.from_spec(spec.distill, t_layers, s_layers, layer_weights)
    t_names, s_names = methods.tap_names(ms)
    teacher_fn = None
    if spec.distill.uses_teacher:
        teacher, _ = _build_teacher(run)
        freeze(teacher)
        teacher_fn = make_teacher(run, teacher, t_names)
    distiller = methods.Distiller(FeatureTap(student, s_names, "distill.layers.student"), teacher_fn, ms)
    if teacher_fn is not None:
        _set_weights(run, distiller, student)
    chosen = _train(run, "distill", student, distiller, spec.train.epochs, spec.train.lr)
    run.save_stage_weights(student, "distilled.safetensors")
    run.state.results["distilled"] = chosen
    return chosen["select_acc"]


def _set_weights(run: Run, distiller: Distiller, student: torch.nn.Module) -> None:
    """SP and KD weights: the user's numbers, or `auto` measured now (kept across a resume)."""
    saved = run.state.results.get("distill_weights")
    if saved is None:
        saved = _choose_weights(run, distiller, student)
        run.state.results["distill_weights"] = saved
        run.save()
    distiller.sp_weight = saved["sp"]["weight"]
    distiller.sp_ref_batch = saved["sp"]["ref_batch"]
    distiller.kd_weight = saved["kd"]["weight"]


def _teacher_check(run: Run) -> dict[str, Any] | None:
    """Is the fine-tuned teacher better than the student alone on the selection split?"""
    teacher, baseline = run.state.results.get("teacher"), run.state.results.get("baseline")
    if not run.selecting or not teacher or not baseline or teacher.get("select_acc") is None:
        return None
    t, b = teacher["select_acc"], baseline["select_acc"]
    return {"teacher_select_acc": t, "baseline_select_acc": b, "teacher_better": t > b}


def _choose_weights(run: Run, distiller: Distiller, student: torch.nn.Module) -> dict[str, Any]:
    spec = run.spec.distill
    check = _teacher_check(run)
    weak = check is not None and not check["teacher_better"]
    sp_share, kd_share = autoweight.SP_SHARE, autoweight.KD_SHARE
    if weak:
        sp_share *= autoweight.WEAK_TEACHER_FACTOR
        kd_share *= autoweight.WEAK_TEACHER_FACTOR
        auto = [n for n, w in (("SP", spec.sp_weight), ("KD", spec.kd_weight)) if w == AUTO_WEIGHT]
        action = (
            f"auto weights: lowering {' and '.join(auto)}'s share of the cross-entropy "
            f"x{autoweight.WEAK_TEACHER_FACTOR:g}"
            if auto
            else "the given weights are used as they are"
        )
        run.reporter.event(
            "warning",
            f"the fine-tuned teacher ({100 * check['teacher_select_acc']:.1f}%) is not better than the "
            f"student fine-tuned alone ({100 * check['baseline_select_acc']:.1f}%) on the selection split: "
            f"it has little to teach; {action}",
            **check,
        )
        check = {**check, "action": action}
    measured = None
    if AUTO_WEIGHT in (spec.sp_weight, spec.kd_weight):
        train_batches, _ = _loaders(run, "distill")
        norm = Normalizer(run.student_cfg, run.runtime, student)
        distiller.sp_weight, distiller.kd_weight = 1.0, 1.0 if spec.kd_on else 0.0
        measured = autoweight.measure(distiller, norm, train_batches(0), run.runtime)
    batch = run.spec.train.batch_size
    if spec.kd_weight == AUTO_WEIGHT:
        assert measured is not None
        kd = {
            "mode": "auto",
            "share": kd_share,
            "weight": autoweight.auto_weight(kd_share, measured.ce, measured.kd_raw),
        }
    else:
        kd = {"mode": "given" if spec.kd_on else "off", "weight": float(spec.kd_weight)}
    if spec.sp_weight == AUTO_WEIGHT:
        assert measured is not None
        sp = {
            "mode": "auto",
            "share": sp_share,
            "weight": autoweight.auto_weight(sp_share, measured.ce, measured.sp_raw),
            "ref_batch": measured.batch_size,
        }
    elif isinstance(spec.sp_weight, list):
        sp = _search(run, distiller.teacher, spec.sp_weight, kd["weight"])
    else:
        sp = {"mode": "given", "weight": float(spec.sp_weight), "ref_batch": batch}
    chosen = {
        "sp": sp,
        "kd": kd,
        "measured": measured.as_dict() if measured else None,
        "teacher_check": check,
    }
    run.reporter.event("distill_weights", _weights_message(chosen), **chosen)
    return chosen


def search_rungs(candidates: int, epochs: int) -> list[int]:
    """Epochs per successive-halving rung before the full run: ceil(log2(k)) rungs, each keeping the
    better half; rung budgets double, the last one epochs/4 (at least 1 epoch each)."""
    rungs = math.ceil(math.log2(candidates)) if candidates > 1 else 0
    return [max(1, epochs >> (rungs - r + 1)) for r in range(rungs)]


def _search(run: Run, teacher_fn, weights_list: list[float], kd_weight: float) -> dict[str, Any]:
    """Successive halving over SP weight candidates, judged on the selection split.

    Every candidate starts from the same student initialisation and the same fine-tuned teacher
    (and teacher cache); rung r trains each survivor for search_rungs()[r] epochs (its own warm-up
    and cosine schedule) and keeps the better half by best selection accuracy (ties: the smaller
    weight, the one closer to fine-tuning alone). The winner is then trained for the full schedule
    by the distill stage. Costs sum(k_r x e_r) extra epochs instead of (k - 1) full runs.
    """
    spec = run.spec
    t_layers, s_layers, layer_weights = layer_pairs(spec)
    alive = sorted(weights_list)
    results: list[dict[str, Any]] = []
    train_batches, val_batches = _loaders(run, "distill")
    steps = _steps_per_epoch(len(run.train_set), spec.train.batch_size)
    rungs = search_rungs(len(alive), spec.train.epochs)
    run.clock.total_steps += sum(e * steps * math.ceil(len(alive) / 2**r) for r, e in enumerate(rungs))
    for rung, epochs in enumerate(rungs):
        scored = []
        for w in alive:
            student = _build_student(run)
            ms = methods.from_spec(
                spec.distill, t_layers, s_layers, layer_weights, w, kd_weight, spec.train.batch_size
            )
            s_names = methods.tap_names(ms)[1]
            distiller = methods.Distiller(
                FeatureTap(student, s_names, "distill.layers.student"), teacher_fn, ms
            )
            plan = StagePlan(
                name=f"search_r{rung}_{w:g}",
                model=student,
                distiller=distiller,
                student_norm=Normalizer(run.student_cfg, run.runtime, student),
                epochs=epochs,
                lr=spec.train.lr,
                weight_decay=spec.train.weight_decay,
                seed=spec.train.seed,
                train_batches=train_batches,
                val_batches=val_batches,
                steps_per_epoch=steps,
                eval_split="selection",
            )
            curve, seconds = train_stage(plan, run.runtime, run.reporter, run.clock, lambda _p: None)
            best = best_row(curve)
            scored.append((best["val_acc"], -w))
            results.append(
                {
                    "sp_weight": w,
                    "rung": rung,
                    "epochs": epochs,
                    "select_acc": best["val_acc"],
                    "seconds": seconds,
                }
            )
            run.reporter.event(
                "search",
                f"SP weight {w:g}, rung {rung + 1}/{len(rungs)} ({epochs} epoch(s)): "
                f"selection accuracy {100 * best['val_acc']:.1f}%",
                **results[-1],
            )
        keep = max(1, math.ceil(len(alive) / 2))
        alive = sorted(-neg for _, neg in sorted(scored, reverse=True)[:keep])
    winner = alive[0]
    for r in results:
        r["chosen"] = r["sp_weight"] == winner and r["rung"] == len(rungs) - 1
    return {"mode": "search", "weight": winner, "ref_batch": spec.train.batch_size, "candidates": results}


def _weights_message(chosen: dict[str, Any]) -> str:
    sp, kd, m = chosen["sp"], chosen["kd"], chosen["measured"]
    parts = []
    if sp["mode"] == "auto":
        parts.append(
            f"SP weight {sp['weight']:.4g} (auto: SP set to {sp['share']:g} x CE; measured CE {m['ce']:.3f}, "
            f"raw SP {m['sp_raw']:.3g} over {m['batches']} batches of {m['batch_size']})"
        )
    elif sp["mode"] == "search":
        tried = ", ".join(f"{c:g}" for c in sorted({r["sp_weight"] for r in sp["candidates"]}))
        parts.append(f"SP weight {sp['weight']:g} (searched among {tried} on the selection split)")
    else:
        parts.append(f"SP weight {sp['weight']:g} (given, at batch {sp['ref_batch']})")
    if kd["mode"] == "auto":
        parts.append(f"KD weight {kd['weight']:.4g} (auto: KD set to {kd['share']:g} x CE)")
    elif kd["mode"] == "given":
        parts.append(f"KD weight {kd['weight']:g} (given)")
    return "; ".join(parts) + "; the SP weight follows the batch size (x b / reference batch)"


def make_teacher(run: Run, teacher: torch.nn.Module, layers: list[str]) -> LiveTeacher:
    """The one place the distill stage gets teacher outputs from (a feature cache can plug in here)."""
    live = LiveTeacher(
        FeatureTap(teacher, layers, "distill.layers.teacher"),
        Normalizer(run.teacher_cfg, run.runtime, teacher),
        run.runtime,
    )
    return run.fast.teacher(live) if run.fast is not None else live


def _student(run: Run, which: str) -> torch.nn.Module:
    """The `distilled` or `baseline` student as its stage left it (its best epoch)."""
    model, _ = weights.build(run.spec.student.model, "none", run.num_classes, "student", run.image_size)
    _load(model, run.ckpt_file(f"{which}.safetensors"))
    return prepare(model, run.runtime)


@torch.no_grad()
def predict(run: Run, model: torch.nn.Module, cfg: DataConfig, batches) -> dict[str, Any]:
    """Per-image predictions on a split: labels, preds, accuracy, mean CE loss (fp32)."""
    model.eval()
    norm = Normalizer(cfg, run.runtime, model)
    labels: list[int] = []
    preds: list[int] = []
    loss = 0.0
    with torch.inference_mode():
        for images, y, _ in batches:
            images, y = images.to(run.runtime.device), y.to(run.runtime.device)
            with run.runtime.autocast():
                logits = model(norm(images))
            loss += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            labels += y.tolist()
            preds += logits.argmax(1).tolist()
    n = max(1, len(labels))
    acc = sum(int(a == b) for a, b in zip(labels, preds, strict=True)) / n
    return {"labels": labels, "preds": preds, "acc": acc, "loss": loss / n}


def _per_class(run: Run, p: dict[str, Any]) -> dict[str, float | None]:
    out = {}
    for i, name in enumerate(run.scan.classes):
        hits = [int(pr == i) for y, pr in zip(p["labels"], p["preds"], strict=True) if y == i]
        out[name] = sum(hits) / len(hits) if hits else None
    return out


def _evaluate(run: Run) -> float:
    """Score the students and the teacher on the report split; decide which student ships."""
    results = run.state.results
    report = _eval_batches(run, "report")
    preds = {}
    for which in ("distilled", "baseline"):
        if which not in results:
            continue
        p = predict(run, _student(run, which), run.student_cfg, report())
        guards.check_value(p["loss"], "evaluate", None, f"{which}_val_loss")
        preds[which] = p
        results[which] = {
            **results[which],
            "val_acc": p["acc"],
            "val_loss": p["loss"],
            "per_class_acc": _per_class(run, p),
        }
    teacher, head = _build_teacher(run)
    if head:
        t = predict(run, teacher, run.teacher_cfg, report())
        guards.check_value(t["loss"], "evaluate", None, "teacher_val_loss")
        results["teacher"] = {**results.get("teacher", {}), "val_acc": t["acc"], "val_loss": t["loss"]}
    else:
        results.setdefault("teacher", {"val_acc": None})
    if "baseline" in preds:
        cmp = stats.compare(
            preds["baseline"]["labels"],
            preds["baseline"]["preds"],
            preds["distilled"]["preds"],
            run.scan.classes,
            seed=run.spec.train.seed,
        )
        results["comparison"] = cmp
        run.reporter.event("gain", stats.summary_line(cmp), **{k: cmp[k] for k in _GAIN_KEYS})
    results["shipped"] = _ship(run)
    return results[results["shipped"]["student"]]["val_acc"]


_GAIN_KEYS = ("n", "gain_points", "ci95_points", "mcnemar", "verdict")


def _ship(run: Run) -> dict[str, Any]:
    """The distilled student ships unless the baseline beats it on the selection split."""
    results = run.state.results
    d, b = results["distilled"], results.get("baseline")
    if b is None:
        return {"student": "distilled", "reason": "no baseline was trained"}
    if not run.selecting:
        return {"student": "distilled", "reason": "no selection split (selection_fraction 0)"}
    if b["select_acc"] > d["select_acc"]:
        reason = (
            f"the student fine-tuned alone beat the distilled student on the selection split "
            f"({100 * b['select_acc']:.1f}% vs {100 * d['select_acc']:.1f}%): student.* is the baseline"
        )
        run.reporter.event("warning", reason, shipped="baseline")
        return {"student": "baseline", "reason": reason}
    reason = (
        f"the distilled student is at least as good as the baseline on the selection split "
        f"({100 * d['select_acc']:.1f}% vs {100 * b['select_acc']:.1f}%)"
    )
    run.reporter.event("info", reason, shipped="distilled")
    return {"student": "distilled", "reason": reason}


def _export(run: Run) -> None:
    start = time.perf_counter()
    out, spec, results = run.staging_dir, run.spec, run.state.results
    if out.exists():  # a half-written export of this attempt (an earlier try was stopped)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shipped = results["shipped"]["student"]
    for which in ("distilled", "baseline"):
        if which not in results:
            continue
        student = _student(run, which)
        guards.require_finite_weights(student, f"{which} student")  # never export NaN weights
        card = export.model_card(
            spec.student.model,
            run.scan.classes,
            run.student_cfg,
            val_acc=results[which]["val_acc"],
            trained=which,
        )
        names = [which, "student"] if which == shipped else [which]
        for name in names:
            export.save_weights(student, out / f"{name}.safetensors")
            export.write_json(out / f"{name}.json", card)
        if which == shipped:
            exporter = export.export_onnx(student, run.image_size, out / "student.onnx")
            run.reporter.event("info", f"exported student.onnx ({exporter} exporter, the {which} student)")
    teacher, _ = _build_teacher(run)
    guards.require_finite_weights(teacher, "teacher")  # never export NaN weights
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
    folders = _hub_folders(run, out, shipped, teacher)
    run.state.timing["export"] = round(time.perf_counter() - start, 3)
    metrics = build_metrics(run)
    export.write_json(out / "metrics.json", metrics)
    for folder, (title, role) in folders.items():
        export.write_model_card(folder, title, _card_lines(run, role, metrics))
    write_report(out)  # report.html + curves.png from metrics.json
    _publish(run, out)


def _hub_folders(run: Run, out: Path, shipped: str, teacher: torch.nn.Module) -> dict[Path, tuple[str, str]]:
    """Each model in timm's hub layout: `student/` (the one that ships), the other student under its
    own name (`baseline/` or `distilled/`), `teacher/`. Returns {folder: (card title, role)}."""
    spec, results = run.spec, run.state.results
    folders: dict[Path, tuple[str, str]] = {}
    for which in ("distilled", "baseline"):
        if which in results:
            folder = out / ("student" if which == shipped else which)
            export.save_hub_folder(_student(run, which), folder, run.scan.classes, run.student_cfg)
            folders[folder] = (f"{spec.student.model} ({which} student, spkd)", which)
    export.save_hub_folder(teacher, out / "teacher", run.scan.classes, run.teacher_cfg)
    folders[out / "teacher"] = (f"{spec.teacher.model} (fine-tuned teacher, spkd)", "teacher")
    return folders


def _card_lines(run: Run, role: str, metrics: dict[str, Any]) -> list[str]:
    """The model card's body: what it is, on what data, its accuracy (with the gain's interval)."""
    spec, results = run.spec, run.state.results
    how = {
        "distilled": f"fine-tuned with cross-entropy plus Similarity-Preserving KD (Tung & Mori, ICCV 2019) "
        f"from the fine-tuned teacher `{spec.teacher.model}`",
        "baseline": "fine-tuned alone (cross-entropy), the comparison run of a distillation job",
        "teacher": "the teacher, fine-tuned on this data",
    }[role]
    sizes = metrics["protocol"]["sizes"]
    acc = (results.get(role) or {}).get("val_acc")
    lines = [
        f"`{spec.teacher.model if role == 'teacher' else spec.student.model}`, {how}.",
        "",
        f"- Classes ({len(run.scan.classes)}): {', '.join(run.scan.classes)}",
        f"- Data: {sizes['train']} training, {sizes['selection']} selection and {sizes['report']} report "
        f"images (report split: {metrics['protocol']['report']})",
        f"- Accuracy on the report split: {'n/a' if acc is None else f'{100 * acc:.2f} %'}",
    ]
    cmp = metrics.get("comparison")
    if cmp and role != "teacher":
        low, high = cmp["ci95_points"]
        lines.append(
            f"- Distilled minus fine-tuned alone: {cmp['gain_points']:+.2f} points "
            f"(95 % CI {low:+.2f} to {high:+.2f}; McNemar p = {cmp['mcnemar']['p_value']:.3g}): "
            f"{cmp['verdict']}"
        )
    lines += [
        f"- Shipped student: {metrics['shipped']} ({metrics['shipped_reason']})",
        "",
        "```python",
        "import timm",
        "",
        'model = timm.create_model("local-dir:.", pretrained=True).eval()  # this folder',
        'labels = model.pretrained_cfg["label_names"]',
        "```",
        "",
        "The job spec:",
        "",
        "```json",
        json.dumps(spec.model_dump(mode="json"), indent=2),
        "```",
    ]
    return lines


def _publish(run: Run, staged: Path) -> None:
    """Move every staged artifact into out_dir, right after the fencing check.

    A rename cannot be made conditional on the job store atomically: a run frozen between the
    check and these renames (a few microseconds of work) would still rename its files on thaw.
    What remains true then: the files are complete (renames of fsynced files), and the stale run
    is refused at its next store write, so it registers nothing and never ends the job."""
    entries = sorted(p for p in staged.iterdir() if not p.name.startswith("."))
    run.guard()
    for p in entries:
        dest = run.out_dir / p.name
        if p.is_dir() and dest.is_dir():  # an earlier export of this job (a resumed run)
            shutil.rmtree(dest)
        os.replace(p, dest)


def build_metrics(run: Run) -> dict[str, Any]:
    """metrics.json: report-split accuracies, selection choices, the gain with its statistics."""
    results = run.state.results
    baseline = results.get("baseline")
    distilled = results["distilled"]
    gain = distilled["val_acc"] - baseline["val_acc"] if baseline else None
    return {
        "teacher": results.get("teacher", {"val_acc": None}),
        "baseline": baseline,
        "distilled": distilled,
        "gain": gain,
        "comparison": results.get("comparison"),
        "shipped": results["shipped"]["student"],
        "shipped_reason": results["shipped"]["reason"],
        "distill_weights": results.get("distill_weights"),
        "protocol": {
            "train": run.scan.roles["train"],
            "selection": run.scan.roles["selection"],
            "report": run.scan.roles["report"],
            "sizes": run.scan.sizes(),
        },
        "curves": run.state.curves,
        "dataset": run.scan.summary(),
        "timing": run.state.timing,
        "spec": run.spec.model_dump(mode="json"),
        "device": _device_name(run.runtime),
        "gpu_memory_peak_bytes": _gpu_memory_peak(run.runtime),
        "image_size": run.image_size,
    }


def _gpu_memory_peak(runtime: Runtime) -> int | None:
    """Most bytes the job's tensors held on its GPU at once (torch's allocator), None on a CPU. The
    job process runs one job and exits, so the process-wide peak is this job's."""
    return int(torch.cuda.max_memory_allocated(runtime.device)) if runtime.is_cuda else None


def _device_name(runtime: Runtime) -> str:
    if runtime.is_cuda:
        return f"{runtime.device} ({torch.cuda.get_device_name(runtime.device)})"
    return str(runtime.device)


def _cleanup_checkpoints(run: Run) -> None:
    """After success keep only the small state file (a rerun returns at once); drop big weights
    and the folders of earlier attempts."""
    run.guard()
    checkpoint.remove_earlier_attempts(run.out_dir, run.attempt)
    shutil.rmtree(run.staging_dir, ignore_errors=True)
    names = ["teacher.safetensors", "distilled.safetensors", "baseline.safetensors"]
    names += [f"{stage}.best.safetensors" for stage in TRAINING_STAGES]
    for name in names:
        path = run.ckpt_file(name)
        if path.exists():
            path.unlink()
