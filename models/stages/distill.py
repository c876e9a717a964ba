"""distill: the student trained with cross-entropy plus SP (Tung & Mori, ICCV 2019), optional KD and
the methods under `distill.methods` (models/methods/), from the frozen teacher; its SP/KD weights
are given, measured (`auto`) or searched first."""

from __future__ import annotations

from typing import Any

import torch

from spkd.common.spec import AUTO_WEIGHT
from spkd.models import methods
from spkd.models.networks.features import FeatureTap, layer_pairs
from spkd.models.stages.common import build_student, build_teacher, train
from spkd.models.stages.search import search
from spkd.models.training import autoweight
from spkd.models.training.engine import LiveTeacher, Normalizer, freeze
from spkd.models.training.run import Run


def run_stage(run: Run) -> float | None:
    """Train the distilled student; saves checkpoints/distilled.safetensors; returns its selection
    accuracy. The chosen weights are kept in the results (a resumed run does not choose again)."""
    spec = run.spec
    t_layers, s_layers, layer_weights = layer_pairs(spec)
    student = build_student(run)
    ms = methods.from_spec(spec.distill, t_layers, s_layers, layer_weights)
    t_names, s_names = methods.tap_names(ms)
    teacher_fn = None
    if spec.distill.uses_teacher:
        teacher, _ = build_teacher(run)
        freeze(teacher)
        teacher_fn = make_teacher(run, teacher, t_names)
    distiller = methods.Distiller(FeatureTap(student, s_names, "distill.layers.student"), teacher_fn, ms)
    if teacher_fn is not None:
        _set_weights(run, distiller, student)
    chosen = train(run, "distill", student, distiller, spec.train.epochs, spec.train.lr)
    run.save_stage_weights(student, "distilled.safetensors")
    run.state.results["distilled"] = chosen
    return chosen["select_acc"]


def make_teacher(run: Run, teacher: torch.nn.Module, layers: list[str]) -> LiveTeacher:
    """The one place the distill stage gets teacher outputs from (a feature cache can plug in here)."""
    live = LiveTeacher(
        FeatureTap(teacher, layers, "distill.layers.teacher"),
        Normalizer(run.data.teacher_cfg, run.runtime, teacher, run.data.teacher_image_size),
        run.runtime,
    )
    fast = run.data.fast
    return fast.teacher(live) if fast is not None else live


def _set_weights(run: Run, distiller: methods.Distiller, student: torch.nn.Module) -> None:
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


def _choose_weights(run: Run, distiller: methods.Distiller, student: torch.nn.Module) -> dict[str, Any]:
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
        train_batches, _ = run.data.loaders("distill")
        norm = Normalizer(run.data.student_cfg, run.runtime, student, run.data.image_size)
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
    elif isinstance(spec.kd_weight, list):
        kd = {"mode": "search", "weight": None}  # chosen by the search below
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
        sp = {"mode": "search", "weight": None, "ref_batch": batch}
    else:
        sp = {"mode": "given", "weight": float(spec.sp_weight), "ref_batch": batch}
    if spec.searching:
        sp, kd = _searched(run, distiller, sp, kd)
    chosen = {
        "sp": sp,
        "kd": kd,
        "measured": measured.as_dict() if measured else None,
        "teacher_check": check,
    }
    run.reporter.event("distill_weights", _weights_message(chosen), **chosen)
    return chosen


def _searched(
    run: Run, distiller: methods.Distiller, sp: dict[str, Any], kd: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SP and KD weights with the searched one(s) filled in: every pair of a list's candidates
    with the other term's weight (or the other list's candidates) goes to the search."""
    spec = run.spec.distill
    sp_options = spec.sp_weight if isinstance(spec.sp_weight, list) else [sp["weight"]]
    kd_options = spec.kd_weight if isinstance(spec.kd_weight, list) else [kd["weight"]]
    pairs = [(s, k) for s in sp_options for k in kd_options]
    found = search(run, distiller.teacher, pairs, sp["ref_batch"])
    if sp["mode"] == "search":
        sp = {**sp, "weight": found["sp_weight"], "candidates": found["candidates"]}
    if kd["mode"] == "search":
        kd = {**kd, "weight": found["kd_weight"], "candidates": found["candidates"]}
    return sp, kd


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
    elif kd["mode"] == "search":
        tried = ", ".join(f"{c:g}" for c in sorted({r["kd_weight"] for r in kd["candidates"]}))
        parts.append(f"KD weight {kd['weight']:g} (searched among {tried} on the selection split)")
    elif kd["mode"] == "given":
        parts.append(f"KD weight {kd['weight']:g} (given)")
    return "; ".join(parts) + "; the SP weight follows the batch size (x b / reference batch)"
