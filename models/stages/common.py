"""What the stage bodies share: the job's models by role (built once: models/networks/bank.py) and one
training stage with resume, best-epoch choice and epoch-end checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spkd.common.metric_names import row_acc, row_loss
from spkd.models.methods import Distiller
from spkd.models.networks.bank import ModelKey
from spkd.models.networks.features import FeatureTap
from spkd.models.results import export
from spkd.models.training import checkpoint
from spkd.models.training.engine import Normalizer, StagePlan, StageResume, prepare, train_stage
from spkd.models.training.run import Run


# ------------------------------------------------------------------------------------ models
def _key(run: Run, role: str) -> ModelKey:
    size = run.data.teacher_image_size if role == "teacher" else run.data.image_size
    return ModelKey.of(run.spec, role, run.scan.classes, size)


def build_student(run: Run) -> torch.nn.Module:
    """A new copy of the job's initial student on the device: the baseline, the distilled student
    and every search candidate start from the same weights (and the same new head)."""
    model, _ = run.models.copy(_key(run, "student"))
    return prepare(model, run.runtime)


def build_teacher(run: Run) -> tuple[torch.nn.Module, bool]:
    """(teacher, head knows the classes) as the later stages use it: a copy of the job's initial
    teacher, with the fine-tuned weights once teacher_finetune has run."""
    model, head = run.models.copy(_key(run, "teacher"))
    finetuned = run.ckpt_file("teacher.safetensors")
    if "teacher_finetune" in run.state.completed and finetuned.is_file():
        load_weights(model, finetuned)
        head = True
    return prepare(model, run.runtime), head


def finished_student(run: Run, which: str) -> torch.nn.Module:
    """The `distilled` or `baseline` student as its stage left it (its best epoch); loaded once per
    run and shared by evaluate and export."""
    if which not in run.kept:
        model, _ = run.models.copy(_key(run, "student"))
        load_weights(model, run.ckpt_file(f"{which}.safetensors"))
        run.kept[which] = prepare(model, run.runtime)
    return run.kept[which]


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of same-architecture state_dicts ("model soups", Wortsman et al., ICML
    2022, the uniform soup): every floating tensor, BN running means and variances included, is
    averaged in float64 and cast back; integer tensors (BN num_batches_tracked) get the floor of
    the mean. Raises ValueError for no states or mismatched keys."""
    if not states or any(s.keys() != states[0].keys() for s in states):
        raise ValueError("average_state_dicts needs state_dicts with the same keys")
    out = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key].detach().to("cpu", torch.float64) for s in states])
        mean = stacked.mean(0)
        out[key] = (mean if first.is_floating_point() else mean.floor()).to(first.dtype)
    return out


def student_soup(run: Run) -> torch.nn.Module:
    """The weight average of the finished baseline and distilled students (both started from the
    same weights, so their average sits in the same basin; see average_state_dicts)."""
    model, _ = run.models.copy(_key(run, "student"))
    states = [finished_student(run, w).state_dict() for w in ("baseline", "distilled")]
    model.load_state_dict(average_state_dicts(states))
    return prepare(model, run.runtime)


def finished_teacher(run: Run) -> tuple[torch.nn.Module, bool]:
    """`build_teacher`, once per run for evaluate and export."""
    if "teacher" not in run.kept:
        run.kept["teacher"] = build_teacher(run)
    return run.kept["teacher"]


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


# ---------------------------------------------------------------------------------- training
def plain(model: torch.nn.Module) -> Distiller:
    """Cross-entropy only (no teacher, no method, no feature tapped): fine-tuning."""
    return Distiller(FeatureTap(model, []), None, [])


def best_row(curve: list[dict]) -> dict:
    """The epoch with the highest selection accuracy; ties go to the later epoch."""
    return max(curve, key=lambda r: (row_acc(r), r["epoch"]))


def stalled(curve: list[dict], patience: int) -> bool:
    """True when the last `patience` epochs brought no strictly higher accuracy than the best
    before them (early stopping on the accuracy of the split every epoch is scored on)."""
    if len(curve) <= patience:
        return False
    before = max(row_acc(r) for r in curve[:-patience])
    return max(row_acc(r) for r in curve[-patience:]) <= before


def _best_file(run: Run, stage: str) -> Path:
    return run.ckpt_file(f"{stage}.best.safetensors")


def _resume(run: Run, stage: str) -> StageResume | None:
    """The stage's state from the checkpoint when it was interrupted mid-way (RNGs restored)."""
    current = run.state.current
    if not current or current["stage"] != stage:
        return None
    checkpoint.set_rng_state(current["rng"])
    return StageResume(
        epoch=current["epoch"],
        model=current["model"],
        optimizer=current["optimizer"],
        scheduler=current["scheduler"],
        rng=current["rng"],
        curve=list(current["curve"]),
        seconds=current["seconds"],
        methods=current.get("methods"),
    )


def train(
    run: Run,
    stage: str,
    model: torch.nn.Module,
    distiller: Distiller,
    epochs: int,
    lr: float,
    patience: int | None = None,
    body_lr_scale: float = 1.0,
) -> dict[str, Any]:
    """Run one training stage with resume and checkpoints; leave `model` at its best epoch.

    With a selection split every epoch is scored on it and the best epoch's weights (ties: the later
    epoch) are kept in checkpoints/<stage>.best.safetensors before the epoch's checkpoint is saved,
    so a resumed run chooses exactly as an uninterrupted one. Without one the last epoch is kept.
    `patience`: stop once the selection accuracy has not improved for that many epochs (the
    schedule still spans `epochs`); None: train every epoch.
    `body_lr_scale`: the body's lr as a fraction of `lr` (the classifier head trains at `lr`).
    Returns {"best_epoch", "select_acc", "select_loss" (both None without selection), "epochs"
    (trained)}.
    """
    train_batches, val_batches = run.data.loaders(stage)
    resume = _resume(run, stage)

    def on_epoch_end(payload: dict[str, Any]) -> None:
        curve = payload["curve"]
        if run.selecting and best_row(curve) is curve[-1]:
            export.save_weights(model, _best_file(run, stage), run.guard)
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
        student_norm=Normalizer(run.data.cfg_for(stage), run.runtime, model, run.data.model_size(stage)),
        epochs=epochs,
        lr=lr,
        weight_decay=run.spec.train.weight_decay,
        seed=run.spec.train.seed,
        train_batches=train_batches,
        val_batches=val_batches,
        steps_per_epoch=run.data.steps_per_epoch,
        eval_split=run.data.choice_split,
        stop=None if patience is None else lambda curve: stalled(curve, patience),
        body_lr_scale=body_lr_scale,
    )
    curve, _ = train_stage(plan, run.runtime, run.reporter, run.clock, on_epoch_end, resume)
    if len(curve) < epochs:
        run.reporter.event(
            "info",
            f"{stage}: stopped after epoch {len(curve)}: no better selection accuracy for {patience} epochs",
            stage=stage,
            epochs=len(curve),
        )
    epochs = len(curve)
    if not run.selecting:
        return {"best_epoch": curve[-1]["epoch"], "select_acc": None, "select_loss": None, "epochs": epochs}
    best = best_row(curve)
    load_weights(model, _best_file(run, stage))
    run.reporter.event(
        "best_epoch",
        f"{stage}: keeping epoch {best['epoch']} of {epochs} (selection accuracy {100 * row_acc(best):.1f}%)",
        stage=stage,
        epoch=best["epoch"],
        select_acc=row_acc(best),
    )
    return {
        "best_epoch": best["epoch"],
        "select_acc": row_acc(best),
        "select_loss": row_loss(best),
        "epochs": epochs,
    }
