"""The distill stage's loss: CE + the named losses of every active method, one forward each model.

The teacher is a plain function (uint8 batch, sample indices) -> (logits or None, features) so a
cache of frozen-teacher outputs can stand in for it. Its features, like the student tap's, are one
tensor per (teacher tap, student tap) pair of `tap_pairs(methods)`: every method's pairs, in method
order, so each method gets exactly the pairs it declared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spkd.models.methods.base import Method, Outputs

# (normalised-or-raw batch, sample indices) -> (logits or None, features per tap pair).
TeacherFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, list[torch.Tensor]]]


def tap_pairs(methods: Iterable[Method]) -> list[tuple[str, str]]:
    """Every method's (teacher tap, student tap) pairs, concatenated in method order."""
    return [pair for m in methods for pair in m.pairs]


def tap_names(methods: Iterable[Method]) -> tuple[list[str], list[str]]:
    """(teacher tap names, student tap names), aligned: what the two FeatureTaps must return."""
    pairs = tap_pairs(methods)
    return [t for t, _ in pairs], [s for _, s in pairs]


def needs(methods: Iterable[Method]) -> tuple[bool, bool]:
    """(features, logits): what the teacher must provide for the active methods."""
    active = [m for m in methods if m.active]
    return any(m.pairs for m in active), any(m.needs_logits for m in active)


class Distiller(nn.Module):
    """CE + every active method's named losses (mdistiller style: forward returns named losses).

    `methods` are submodules: `parameters()` are their learnable parts (the engine optimises them
    with the student) and `state_dict()` is what a checkpoint keeps of them.
    """

    def __init__(self, student_tap, teacher: TeacherFn | None, methods: Sequence[Method]) -> None:
        super().__init__()
        self.student_tap = student_tap
        self.teacher = teacher
        self.methods = nn.ModuleList(methods)
        slots, start = [], 0
        for m in methods:
            slots.append(list(range(start, start + len(m.pairs))))
            start += len(m.pairs)
        self._slots = slots

    # -------------------------------------------------------------------------------- describe
    @property
    def loss_names(self) -> list[str]:
        """Every name `forward` may return: `ce` then each method's, in method order."""
        return ["ce", *(n for m in self.methods for n in m.loss_names)]

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None and any(m.active for m in self.methods)

    def method(self, name: str) -> Method | None:
        return next((m for m in self.methods if m.name == name), None)

    def knobs(self) -> dict[str, tuple[str, float]]:
        """loss name -> (spec field, weight) over the active methods (for non-finite-loss advice)."""
        out: dict[str, tuple[str, float]] = {}
        for m in self.methods:
            if m.active:
                out.update(m.knobs())
        return out

    # ------------------------------------------------------------------------------------ run
    def outputs(self, logits: torch.Tensor | None, features: Sequence[torch.Tensor], i: int) -> Outputs:
        """Method i's view of one model's outputs: its own feature pairs only."""
        return Outputs(logits, [features[k] for k in self._slots[i]])

    def forward(
        self, x_s: torch.Tensor, x_t: torch.Tensor | None, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.student_tap(x_s)
        losses = {"ce": F.cross_entropy(out.logits.float(), labels)}
        if self.needs_teacher:
            t_logits, t_feats = self.teacher(x_t, indices)
            batch = labels.shape[0]
            for i, m in enumerate(self.methods):
                if m.active:
                    s, t = self.outputs(out.logits, out.features, i), self.outputs(t_logits, t_feats, i)
                    losses.update(m(s, t, batch))
        return out.logits, losses

    # ------------------------------------------- the job spec's sp/kd fields (backward compatible)
    def _get(self, name: str) -> Method:
        m = self.method(name)
        if m is None:
            raise AttributeError(f"this distiller has no {name!r} method")
        return m

    @property
    def sp(self):
        """The SP method's layer-weighted SPLoss (autoweight measures it raw)."""
        return self._get("sp").loss

    @property
    def sp_weight(self) -> float:
        return self._get("sp").weight

    @sp_weight.setter
    def sp_weight(self, value: float) -> None:
        self._get("sp").weight = float(value)

    @property
    def sp_ref_batch(self) -> int | None:
        return self._get("sp").ref_batch

    @sp_ref_batch.setter
    def sp_ref_batch(self, value: int | None) -> None:
        self._get("sp").ref_batch = value

    @property
    def kd_weight(self) -> float:
        return self._get("kd").weight

    @kd_weight.setter
    def kd_weight(self, value: float) -> None:
        self._get("kd").weight = float(value)

    @property
    def temperature(self) -> float:
        return self._get("kd").temperature
