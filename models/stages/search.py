"""The distill stage's search over SP and KD weight candidates (`distill.sp_weight: [..]`,
`distill.kd_weight: [..]`), by successive halving on the selection split (as in Jamieson &
Talwalkar, AISTATS 2016)."""

from __future__ import annotations

import math
from typing import Any

from spkd.common.metric_names import row_acc
from spkd.models import methods
from spkd.models.networks.features import FeatureTap, layer_pairs
from spkd.models.stages.common import best_row, build_student
from spkd.models.training.engine import Normalizer, StagePlan, train_stage
from spkd.models.training.run import Run


def search_rungs(candidates: int, epochs: int) -> list[int]:
    """Epochs per successive-halving rung before the full run: ceil(log2(k)) rungs, each keeping the
    better half; rung budgets double, the last one epochs/4 (at least 1 epoch each)."""
    rungs = math.ceil(math.log2(candidates)) if candidates > 1 else 0
    return [max(1, epochs >> (rungs - r + 1)) for r in range(rungs)]


Pair = tuple[float, float]  # (SP weight, KD weight)
PROGRESS = "search_progress"  # run.state.results key: the candidates scored so far (resume)


def search(run: Run, teacher_fn, pairs: list[Pair], sp_ref_batch: int) -> dict[str, Any]:
    """Successive halving over (SP weight, KD weight) candidates, judged on the selection split.

    Every candidate starts from the same student initialisation and the same fine-tuned teacher
    (and teacher cache); rung r trains each survivor for search_rungs()[r] epochs (its own warm-up
    and cosine schedule) and keeps the better half by best selection accuracy (ties: the smaller
    weights, the ones closer to fine-tuning alone). The winner is then trained for the full schedule
    by the distill stage. Costs sum(k_r x e_r) extra epochs instead of (k - 1) full runs.

    Each scored candidate is checkpointed, so a resumed job continues the search where it stopped
    (seeded: a candidate trained again would score the same). Returns {sp_weight, kd_weight,
    candidates: [{sp_weight, kd_weight, rung, epochs, select_acc, seconds, chosen}]}.
    """
    spec = run.spec
    alive = sorted(pairs)
    done = {(r["rung"], r["sp_weight"], r["kd_weight"]): r for r in run.state.results.get(PROGRESS, [])}
    results: list[dict[str, Any]] = []
    rungs = search_rungs(len(alive), spec.train.epochs)
    steps = run.data.steps_per_epoch
    todo = sum(e * math.ceil(len(alive) / 2**r) for r, e in enumerate(rungs))
    run.clock.total_steps += steps * (todo - sum(r["epochs"] for r in done.values()))
    for rung, epochs in enumerate(rungs):
        scored = []
        for pair in alive:
            row = done.get((rung, *pair)) or _score(run, teacher_fn, pair, sp_ref_batch, rung, epochs)
            results.append(row)
            if (rung, *pair) not in done:
                run.state.results[PROGRESS] = list(results)
                run.save()
            run.reporter.event(
                "search",
                f"SP weight {pair[0]:g}, KD weight {pair[1]:g}, rung {rung + 1}/{len(rungs)} "
                f"({epochs} epoch(s)): selection accuracy {100 * row['select_acc']:.1f}%"
                f"{' (from the checkpoint)' if (rung, *pair) in done else ''}",
                **row,
            )
            scored.append((row["select_acc"], -pair[0], -pair[1]))
        keep = max(1, math.ceil(len(alive) / 2))
        alive = sorted((-s, -k) for _, s, k in sorted(scored, reverse=True)[:keep])
    winner = alive[0]
    for r in results:
        r["chosen"] = (r["sp_weight"], r["kd_weight"]) == winner and r["rung"] == len(rungs) - 1
    run.state.results.pop(PROGRESS, None)
    return {"sp_weight": winner[0], "kd_weight": winner[1], "candidates": results}


def _score(run: Run, teacher_fn, pair: Pair, sp_ref_batch: int, rung: int, epochs: int) -> dict[str, Any]:
    """Train one candidate for `epochs` from the shared initialisation; its best selection accuracy."""
    spec = run.spec
    t_layers, s_layers, layer_weights = layer_pairs(spec)
    sp_w, kd_w = pair
    student = build_student(run)
    ms = methods.from_spec(spec.distill, t_layers, s_layers, layer_weights, sp_w, kd_w, sp_ref_batch)
    s_names = methods.tap_names(ms)[1]
    distiller = methods.Distiller(FeatureTap(student, s_names, "distill.layers.student"), teacher_fn, ms)
    train_batches, val_batches = run.data.loaders("distill")
    plan = StagePlan(
        name=f"search_r{rung}_{sp_w:g}_{kd_w:g}",
        model=student,
        distiller=distiller,
        student_norm=Normalizer(run.data.student_cfg, run.runtime, student, run.data.image_size),
        epochs=epochs,
        lr=spec.train.lr,
        weight_decay=spec.train.weight_decay,
        seed=spec.train.seed,
        train_batches=train_batches,
        val_batches=val_batches,
        steps_per_epoch=run.data.steps_per_epoch,
        eval_split="selection",
    )
    curve, seconds = train_stage(plan, run.runtime, run.reporter, run.clock, lambda _p: None)
    return {
        "sp_weight": sp_w,
        "kd_weight": kd_w,
        "rung": rung,
        "epochs": epochs,
        "select_acc": row_acc(best_row(curve)),
        "seconds": seconds,
    }
