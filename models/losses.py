"""The SP and KD losses and the distiller, as they were importable before models/methods/.

The methods themselves live in models/methods/ (one file each, found by name); this module keeps
the original names and the original `Distiller(student_tap, teacher, layer_weights, sp_weight,
kd_weight, temperature, sp_ref_batch)` constructor working.
"""

from __future__ import annotations

from collections.abc import Sequence

from models import methods
from models.methods.kd import KD, kd_loss
from models.methods.sp import SP, SPLoss, similarity, sp_loss

TeacherFn = methods.TeacherFn

__all__ = ["Distiller", "SPLoss", "TeacherFn", "kd_loss", "similarity", "sp_loss"]


class Distiller(methods.Distiller):
    """CE + sp_weight * SP (+ kd_weight * KD) (+ `extra` methods), the original constructor.

    SP compares the first len(layer_weights) features of `student_tap` with the teacher's; `extra`
    methods' pairs follow them (models.methods.tap_pairs).
    """

    def __init__(
        self,
        student_tap,
        teacher: TeacherFn | None,
        layer_weights: Sequence[float],
        sp_weight: float,
        kd_weight: float,
        temperature: float,
        sp_ref_batch: int | None = None,
        extra: Sequence[methods.Method] = (),
    ) -> None:
        names = list(getattr(student_tap, "names", []))[: len(layer_weights)]
        pairs = [(n, n) for n in names] or [(methods.AUTO, methods.AUTO)] * len(layer_weights)
        super().__init__(
            student_tap,
            teacher,
            [SP(pairs, layer_weights, sp_weight, sp_ref_batch), KD(kd_weight, temperature), *extra],
        )
