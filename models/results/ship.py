"""Which student ships: the student fine-tuned alone unless the evidence for another is real.

The candidates are judged on the selection split's *ship part* (models/data/loader.py
`with_ship_part`): images that picked no best epoch and no weight, so no candidate was chosen for
doing well on them. Each candidate is given as its per-image labels, predictions and log-losses
(cross-entropy of the true class, nats) on those images.

The rule (`decide`), for each challenger C (the distilled student, the weight-averaged "soup")
against the baseline B, on the same n images:

1. accuracy: acc(C) >= acc(B) (C is not worse at the thing the user reads), and
2. mean log-loss: the 95 % paired bootstrap interval of mean(loss_C - loss_B) (images resampled with
   replacement, seeded; models/results/stats.py `paired_bootstrap_ci`) lies entirely below 0.

Why this statistic: on a ship part of 12-100 images accuracy moves in steps of 1-8 points and two
students of the same architecture tie or differ by an image or two, which is noise (the user's
17-class set: the shipped distilled student was one or two selection images better and a point
worse on the report split). The log-loss uses every image's predicted probability, so it resolves
differences the 0/1 accuracy cannot; pairing (the same images for both) removes the images' own
difficulty from the variance; the bootstrap needs no normality and no independence beyond the
images'. Requiring both keeps a challenger that is only better calibrated (lower loss, fewer hits)
from shipping. The interval excluding 0 is the margin: it scales with the noise of the split at
hand, where a fixed margin would be too strict on a large split and too loose on a small one.
When several challengers pass, the one with the lowest mean log-loss ships. Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spkd.models.results.stats import paired_bootstrap_ci

DEFAULT = "baseline"
BOOTSTRAP_SAMPLES = 2_000


def candidate_stats(labels: Sequence[int], preds: Sequence[int], losses: Sequence[float]) -> dict[str, Any]:
    """{"n", "acc" (0-1), "loss" (mean log-loss, nats)} of one candidate on the ship part."""
    n = len(labels)
    if n == 0 or len(preds) != n or len(losses) != n:
        raise ValueError("candidate_stats needs equal-length, non-empty labels, preds and losses")
    acc = sum(int(a == b) for a, b in zip(labels, preds, strict=True)) / n
    return {"n": n, "acc": acc, "loss": float(np.mean(np.asarray(losses, dtype=np.float64)))}


def loss_interval(
    losses_base: Sequence[float],
    losses_other: Sequence[float],
    seed: int = 0,
    samples: int = BOOTSTRAP_SAMPLES,
) -> tuple[float, float]:
    """95 % paired bootstrap interval of mean(loss_other - loss_base), nats (negative: other better)."""
    low, high = paired_bootstrap_ci(
        np.asarray(losses_base, dtype=np.float64), np.asarray(losses_other, dtype=np.float64), seed, samples
    )
    return low / 100, high / 100


def decide(candidates: Mapping[str, Mapping[str, Sequence]], seed: int = 0) -> dict[str, Any]:
    """The shipped candidate and why, from per-image results on the ship part.

    `candidates`: {name: {"labels", "preds", "losses"}}, one of them "baseline", all on the same
    images in the same order. Returns {"student": name, "reason": str, "evidence": {name: {"acc",
    "loss", "n"} and, for each challenger, "loss_diff", "loss_ci95", "passes"}}. Raises ValueError
    without a baseline or when the candidates were not scored on the same images.
    """
    if DEFAULT not in candidates:
        raise ValueError("decide needs the baseline among the candidates")
    base = candidates[DEFAULT]
    evidence: dict[str, Any] = {}
    for name, c in candidates.items():
        if list(c["labels"]) != list(base["labels"]):
            raise ValueError(f"candidate {name!r} was not scored on the baseline's images")
        evidence[name] = candidate_stats(c["labels"], c["preds"], c["losses"])
    b = evidence[DEFAULT]
    passing = []
    for name in candidates:
        if name == DEFAULT:
            continue
        e = evidence[name]
        low, high = loss_interval(base["losses"], candidates[name]["losses"], seed)
        e |= {
            "loss_diff": e["loss"] - b["loss"],
            "loss_ci95": [low, high],
            "passes": e["acc"] >= b["acc"] and high < 0,
        }
        if e["passes"]:
            passing.append(name)
    n = b["n"]

    def line(name: str) -> str:
        e = evidence[name]
        return (
            f"{name} {100 * e['acc']:.1f}% / log-loss {e['loss']:.3f} "
            f"(diff {e['loss_diff']:+.3f}, 95% CI [{e['loss_ci95'][0]:+.3f}, {e['loss_ci95'][1]:+.3f}])"
        )

    base_line = f"baseline {100 * b['acc']:.1f}% / log-loss {b['loss']:.3f}"
    others = "; ".join(line(name) for name in candidates if name != DEFAULT)
    where = f"on the {n} ship-part images of the selection split (used for no other choice)"
    if not passing:
        return {
            "student": DEFAULT,
            "reason": f"no candidate was both as accurate and reliably lower in log-loss than the student "
            f"fine-tuned alone {where}: {base_line}; {others}",
            "evidence": evidence,
        }
    best = min(passing, key=lambda name: (evidence[name]["loss"], name))
    return {
        "student": best,
        "reason": f"the {best} student was as accurate and lower in log-loss (95% interval below 0) "
        f"than the student fine-tuned alone {where}: {base_line}; {others}",
        "evidence": evidence,
    }
