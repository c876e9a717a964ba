"""evaluate: score the students (the baseline, the distilled one and their weight average, the
"soup") and the teacher on the report split, compare the students (models/results/stats.py), and
decide which student ships, never on the report split: with a ship part (dataset.ship_fraction > 0)
by evidence on it (models/results/ship.py), images that picked no best epoch; without one by the old
rule on the selection split (`distilled_wins`)."""

from __future__ import annotations

from typing import Any

import torch

from spkd.models.networks.factory import DataConfig
from spkd.models.results import ship, stats
from spkd.models.stages.common import finished_student, finished_teacher, student_soup
from spkd.models.training import guards
from spkd.models.training.engine import Normalizer
from spkd.models.training.run import Run

_GAIN_KEYS = ("n", "gain_points", "ci95_points", "mcnemar", "verdict")


def run_stage(run: Run) -> float:
    """Fill results' report-split accuracies, the comparison and `shipped`; returns the shipped
    student's report accuracy. Raises SpkdError `non_finite_loss` for a NaN model."""
    results = run.state.results
    report = run.data.eval_batches("report")
    preds = {}
    if "baseline" in results:  # the third candidate, free: the average of the two students' weights
        results["soup"] = {"of": ["baseline", "distilled"]}
        run.kept["soup"] = student_soup(run)
        run.save_stage_weights(run.kept["soup"], "soup.safetensors")
    for which in ("distilled", "baseline", "soup"):
        if which not in results:
            continue
        p = predict(run, finished_student(run, which), run.data.student_cfg, report())
        guards.check_value(p["loss"], "evaluate", None, f"{which}_report_loss")
        preds[which] = p
        results[which] = {
            **results[which],
            "report_acc": p["acc"],
            "report_loss": p["loss"],
            "per_class_acc": _per_class(run, p),
        }
    teacher, head = finished_teacher(run)
    if head:
        t_report = run.data.eval_batches("report", run.data.teacher_image_size)  # at the teacher's size
        t = predict(run, teacher, run.data.teacher_cfg, t_report())
        guards.check_value(t["loss"], "evaluate", None, "teacher_report_loss")
        results["teacher"] = {**results.get("teacher", {}), "report_acc": t["acc"], "report_loss": t["loss"]}
    else:
        results.setdefault("teacher", {"report_acc": None})
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
    return results[results["shipped"]["student"]]["report_acc"]


@torch.no_grad()
def predict(run: Run, model: torch.nn.Module, cfg: DataConfig, batches) -> dict[str, Any]:
    """Per-image predictions on a split: labels, preds, per-image CE `losses` (nats), accuracy,
    mean CE loss (fp32)."""
    model.eval()
    norm = Normalizer(cfg, run.runtime, model)
    labels: list[int] = []
    preds: list[int] = []
    losses: list[float] = []
    loss = 0.0
    with torch.inference_mode():
        for images, y, _ in batches:
            images, y = images.to(run.runtime.device), y.to(run.runtime.device)
            with run.runtime.autocast():
                logits = model(norm(images))
            loss += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            losses += torch.nn.functional.cross_entropy(logits.float(), y, reduction="none").tolist()
            labels += y.tolist()
            preds += logits.argmax(1).tolist()
    n = max(1, len(labels))
    acc = sum(int(a == b) for a, b in zip(labels, preds, strict=True)) / n
    return {"labels": labels, "preds": preds, "losses": losses, "acc": acc, "loss": loss / n}


def _per_class(run: Run, p: dict[str, Any]) -> dict[str, float | None]:
    out = {}
    for i, name in enumerate(run.scan.classes):
        hits = [int(pr == i) for y, pr in zip(p["labels"], p["preds"], strict=True) if y == i]
        out[name] = sum(hits) / len(hits) if hits else None
    return out


def distilled_wins(baseline: dict[str, Any], distilled: dict[str, Any]) -> bool:
    """The OLD rule, kept for the bench's comparison and for jobs without a ship part
    (dataset.ship_fraction 0): True when the distilled student has a strictly higher accuracy on
    the selection split that also picked both students' best epochs. A tie ships the baseline.
    Biased towards whichever student was luckier on those images (a winner's curse): prefer
    models/results/ship.py `decide` on the ship part."""
    return distilled["select_acc"] > baseline["select_acc"]


def _ship(run: Run) -> dict[str, Any]:
    """The shipped student: the baseline unless the evidence on the ship part is real
    (models/results/ship.py); without a ship part, the old rule on the selection split."""
    results = run.state.results
    d, b = results["distilled"], results.get("baseline")
    if b is None:
        return {"student": "distilled", "reason": "no baseline was trained"}
    if not run.selecting:
        return {"student": "distilled", "reason": "no selection split (selection_fraction 0)"}
    if run.data.ship_set is None:
        return _old_rule(run, d, b)
    batches = run.data.eval_batches("ship")
    names = ("baseline", "distilled", "soup")
    on_ship = {w: predict(run, finished_student(run, w), run.data.student_cfg, batches()) for w in names}
    decided = ship.decide(on_ship, seed=run.spec.train.seed)
    # what the old rule would have shipped: a strictly higher accuracy on the whole selection split
    # (both parts), at the epochs the pick part chose (bench/accuracy.py compares the rules)
    n_pick, n_ship = len(run.data.selection_set or ()), len(run.data.ship_set)
    whole = {
        w: (results[w]["select_acc"] * n_pick + on_ship[w]["acc"] * n_ship) / (n_pick + n_ship)
        for w in ("baseline", "distilled")
    }
    old = "distilled" if whole["distilled"] > whole["baseline"] else "baseline"
    for w in names:
        results[w]["ship_acc"] = on_ship[w]["acc"]
        results[w]["ship_loss"] = on_ship[w]["loss"]
    level = "info" if decided["student"] != "baseline" else "warning"
    run.reporter.event(level, decided["reason"], shipped=decided["student"])
    return {**decided, "rule": "ship_part", "old_rule": {"student": old, "selection_acc": whole}}


def _old_rule(run: Run, d: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    acc = f"{100 * d['select_acc']:.1f}% vs {100 * b['select_acc']:.1f}% for the student fine-tuned alone"
    if not distilled_wins(b, d):
        reason = (
            f"the distilled student did not beat the student fine-tuned alone on the selection split "
            f"({acc}): student.* is the baseline"
        )
        run.reporter.event("warning", reason, shipped="baseline")
        return {"student": "baseline", "reason": reason, "rule": "selection"}
    reason = f"the distilled student beat the student fine-tuned alone on the selection split ({acc})"
    run.reporter.event("info", reason, shipped="distilled")
    return {"student": "distilled", "reason": reason, "rule": "selection"}
