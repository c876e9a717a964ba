"""Distillation methods behind one base, found by name (models/methods/base.py).

Importing the package registers every method in it (`sp`, `kd`, `rkd`, `dist`). `from_spec` is the one
place a job spec's `distill` section becomes methods: `sp_weight`/`layers` configure `sp`,
`kd_weight`/`temperature` configure `kd` (the spec's original fields), and each entry of
`distill.methods` ({name: options}) is the registered method of that name built with its options.
"""

from __future__ import annotations

from collections.abc import Sequence

from spkd.models.methods import dist, kd, rkd, sp  # noqa: F401  (registers the methods)
from spkd.models.methods.base import AUTO, POOLED, Method, Outputs, create, get, known, register, unregister
from spkd.models.methods.distiller import Distiller, TeacherFn, needs, tap_names, tap_pairs

__all__ = [
    "AUTO",
    "POOLED",
    "Distiller",
    "Method",
    "Outputs",
    "TeacherFn",
    "create",
    "from_spec",
    "get",
    "known",
    "needs",
    "register",
    "spec_needs",
    "tap_names",
    "tap_pairs",
    "unregister",
]


def from_spec(
    distill,
    teacher_layers: Sequence[str],
    student_layers: Sequence[str],
    layer_weights: Sequence[float],
    sp_weight: float = 0.0,
    kd_weight: float = 0.0,
    sp_ref_batch: int | None = None,
) -> list[Method]:
    """The methods of a job's `distill` spec (common.spec.DistillSpec): sp, kd, then distill.methods.

    sp and kd get the given weights (the pipeline sets `auto` ones once measured); their spec
    fields may be `auto` or a list, which is why the weights are arguments here. sp is always
    there (its `sp` column stays in every row), without layer pairs when the spec turns it off.
    Raises SpkdError `unknown_method` for a name no method is registered under.
    """
    pairs = list(zip(teacher_layers, student_layers, strict=True))
    if not distill.sp_on:  # SP off: no taps, so neither model (nor the teacher cache) keeps its maps
        pairs, layer_weights = [], []
    out: list[Method] = [
        sp.SP(pairs, layer_weights, sp_weight, sp_ref_batch),
        kd.KD(kd_weight, distill.temperature, distill.kd_standardize),
    ]
    for name, options in distill.methods.items():
        out.append(create(name, options.model_dump()))
    return out


def spec_needs(distill, teacher_layers: Sequence[str] = (AUTO,)) -> tuple[bool, bool]:
    """(features, logits): what the teacher must provide for the methods the spec turns on."""
    ms = from_spec(
        distill,
        teacher_layers,
        teacher_layers,
        [1.0] * len(teacher_layers),
        sp_weight=1.0 if distill.sp_on else 0.0,
        kd_weight=1.0 if distill.kd_on else 0.0,
    )
    return needs(ms)
