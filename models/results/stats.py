"""Paired comparison of two classifiers on the same images: is the gain more than noise?

From per-image predictions of a model A (the baseline) and B (the distilled student) on the report
split: the gain in points, a seeded 95 % paired bootstrap interval (resampling images, Efron &
Tibshirani 1993, percentile method), McNemar's exact test (the two-sided binomial test on the
discordant pairs, McNemar 1947; exact form as in Edwards 1948 / statsmodels' `exact=True`), per-class
gains and both confusion matrices. Pure Python + NumPy, strict-JSON output (no NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

ALPHA = 0.05
BOOTSTRAP_SAMPLES = 10_000


def mcnemar_exact(b_only: int, a_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    `b_only`: images B gets right and A wrong; `a_only`: the reverse. Under H0 each discordant image
    is B's with probability 1/2, so p = min(1, 2 * P[Binomial(n, 1/2) <= min(b_only, a_only)]),
    n = b_only + a_only; p = 1 when n = 0. Exact rational arithmetic, then one rounding to float.
    """
    if b_only < 0 or a_only < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b_only + a_only
    if n == 0:
        return 1.0
    k = min(b_only, a_only)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def paired_bootstrap_ci(
    correct_a: np.ndarray, correct_b: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
    """95 % percentile interval of acc(B) - acc(A), in points, resampling images with replacement.

    Both arrays are per-image 0/1 (bool) of the same length n >= 1; the same resampled images are
    used for A and B (paired). Seeded: the same inputs and seed give the same interval.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("paired_bootstrap_ci needs two equal-length, non-empty 1-d arrays")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // diff.size)  # bound memory: chunk * n indices at a time
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    return 100 * float(low), 100 * float(high)


def confusion(labels: Sequence[int], preds: Sequence[int], num_classes: int) -> list[list[int]]:
    """num_classes x num_classes counts: row = true class, column = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return m.tolist()


def verdict(gain_points: float, p_value: float) -> str:
    """'better' / 'worse' when McNemar's test rejects equal accuracy at 5 %, else no difference."""
    if p_value < ALPHA and gain_points > 0:
        return "better"
    if p_value < ALPHA and gain_points < 0:
        return "worse"
    return "no detectable difference"


def compare(
    labels: Sequence[int],
    preds_a: Sequence[int],
    preds_b: Sequence[int],
    class_names: Sequence[str],
    seed: int = 0,
    names: tuple[str, str] = ("baseline", "distilled"),
) -> dict[str, Any]:
    """B against A on the same images: gain (points), 95 % paired bootstrap CI, McNemar p, verdict,
    per-class accuracies and gains (points; None for a class with no image), confusion matrices."""
    y = np.asarray(labels, dtype=np.int64)
    pa, pb = np.asarray(preds_a, dtype=np.int64), np.asarray(preds_b, dtype=np.int64)
    if not (y.shape == pa.shape == pb.shape) or y.size == 0:
        raise ValueError("labels and both prediction lists need the same non-zero length")
    ca, cb = pa == y, pb == y
    gain = 100 * float(cb.mean() - ca.mean())
    low, high = paired_bootstrap_ci(ca, cb, seed)
    b_only, a_only = int((cb & ~ca).sum()), int((ca & ~cb).sum())
    p = mcnemar_exact(b_only, a_only)
    per_class = {}
    for i, name in enumerate(class_names):
        mask = y == i
        if not mask.any():
            per_class[name] = {"n": 0, names[0]: None, names[1]: None, "gain": None}
            continue
        acc_a, acc_b = float(ca[mask].mean()), float(cb[mask].mean())
        per_class[name] = {
            "n": int(mask.sum()),
            names[0]: acc_a,
            names[1]: acc_b,
            "gain": round(100 * (acc_b - acc_a), 4),
        }
    k = len(class_names)
    return {
        "n": int(y.size),
        "gain_points": round(gain, 4),
        "ci95_points": [round(low, 4), round(high, 4)],
        "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": seed, "method": "paired percentile"},
        "mcnemar": {f"{names[1]}_only_right": b_only, f"{names[0]}_only_right": a_only, "p_value": p},
        "verdict": verdict(gain, p),
        "per_class": per_class,
        "confusion": {names[0]: confusion(y, pa, k), names[1]: confusion(y, pb, k)},
    }


def summary_line(result: dict[str, Any], names: tuple[str, str] = ("baseline", "distilled")) -> str:
    """One readable line: 'distilled vs baseline: +1.3 points (95 % CI -0.6 to +3.2), McNemar p = 0.21:
    no detectable difference (n = 153)'."""
    low, high = result["ci95_points"]
    return (
        f"{names[1]} vs {names[0]}: {result['gain_points']:+.1f} points "
        f"(95 % CI {low:+.1f} to {high:+.1f}), McNemar p = {result['mcnemar']['p_value']:.3g}: "
        f"{result['verdict']} (n = {result['n']})"
    )
