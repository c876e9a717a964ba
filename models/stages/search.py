"""The distill stage's search over SP weight candidates (`distill.sp_weight: [..]`), by successive
halving on the selection split (as in Jamieson & Talwalkar, AISTATS 2016)."""

from __future__ import annotations

import math
from typing import Any

from models import methods
from models.engine import Normalizer, StagePlan, train_stage
from models.features import FeatureTap, layer_pairs
from models.run import Run
from models.stages.common import best_row, build_student


def search_rungs(candidates: int, epochs: int) -> list[int]:
    """Epochs per successive-halving rung before the full run: ceil(log2(k)) rungs, each keeping the
    better half; rung budgets double, the last one epochs/4 (at least 1 epoch each)."""
    rungs = math.ceil(math.log2(candidates)) if candidates > 1 else 0
    return [max(1, epochs >> (rungs - r + 1)) for r in range(rungs)]


def search(run: Run, teacher_fn, weights_list: list[float], kd_weight: float) -> dict[str, Any]:
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
    train_batches, val_batches = run.data.loaders("distill")
    steps = run.data.steps_per_epoch
    rungs = search_rungs(len(alive), spec.train.epochs)
    run.clock.total_steps += sum(e * steps * math.ceil(len(alive) / 2**r) for r, e in enumerate(rungs))
    for rung, epochs in enumerate(rungs):
        scored = []
        for w in alive:
            student = build_student(run)
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
                student_norm=Normalizer(run.data.student_cfg, run.runtime, student),
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
