"""Similarity-Preserving KD (Tung & Mori, ICCV 2019).

Per layer pair: Q = activations flattened to b x (c*h*w), G = Q Q^T (Eq. 1) row-L2-normalised
(Eq. 2); loss = ||G_t - G_s||_F^2 / b^2 (Eq. 3), summed over the pairs with a weight each; Eq. 4
adds gamma x that to the cross-entropy. It only compares b x b similarities, so the two layers may
differ in channels, spatial size or even be token maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spkd.models.methods.base import Method, Outputs, at_least_fp32, full_precision, register
from spkd.models.training import distributed


def similarity(features: torch.Tensor) -> torch.Tensor:
    """Row-normalised Gram matrix of a batch (b x b), in fp32 at least, autocast or not.

    In half types the Gram sum over c*h*w overflows (fp16: real lite features at 224 px give
    diagonals near 1.5e5) or loses precision (bf16), so it is computed in fp32 with autocast off
    (under autocast `q @ q.t()` would be cast back to bf16/fp16 whatever the dtype of q).
    """
    with full_precision(features.device):
        q = at_least_fp32(features.reshape(features.shape[0], -1))
        return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The paper's SP term for one layer pair: ||G_t - G_s||_F^2 / b^2 (a 0-d tensor, fp32+).

    Inputs: (b, ...) activations of any shapes sharing b. Computed with autocast off, so it is
    the same number under bf16/fp16 mixed precision as in fp32. Raises ValueError on a b mismatch.
    """
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {f_s.shape[0]} vs {f_t.shape[0]}")
    b = f_s.shape[0]
    with full_precision(f_s.device):
        g_s = similarity(f_s)
        diff = similarity(f_t).to(g_s.dtype) - g_s
        return (diff * diff).sum() / (b * b)


class SPLoss(nn.Module):
    """Weighted sum of SP terms over several (student, teacher) layer pairs."""

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        self.weights = [float(w) for w in weights]

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        if not (len(feats_s) == len(feats_t) == len(self.weights)):
            raise ValueError("SPLoss needs one student and one teacher feature per layer pair")
        terms = [w * sp_loss(s, t) for w, s, t in zip(self.weights, feats_s, feats_t, strict=True)]
        return torch.stack(terms).sum()


@register("sp")
class SP(Method):
    """`sp`: weight * SPLoss over the job's layer pairs (spec: distill.sp_weight, distill.layers).

    `ref_batch`: the batch size at which `weight` applies. SP is ~1/b by construction (b x SP is
    nearly flat in b), so at another batch size b (the out-of-memory handler's halves, a short last
    batch) the weight used is weight * b / ref_batch: SP keeps its share.

    On several ranks (train.devices) each rank holds a share of the batch; SP gathers the features
    of the global batch (with their gradients) and compares all its images, as on one device.
    Measured (tests/models/test_distributed.py, 2 gloo ranks, global batch 8): per-rank Gram
    matrices moved the first distill epoch's loss from 8.998 to 9.364 (+4 %), gathering matches
    one device to float tolerance, so the `auto` weight, measured on the global batch, holds.
    """

    loss_names = ("sp",)

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = (("auto", "auto"),),
        layer_weights: Sequence[float] | None = None,
        weight: float = 0.0,
        ref_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.loss = SPLoss(layer_weights if layer_weights is not None else [1.0] * len(self.pairs))
        self.weight = float(weight)
        self.ref_batch = ref_batch

    @property
    def active(self) -> bool:
        return self.weight > 0 and bool(self.pairs)

    def weight_at(self, batch: int) -> float:
        """The SP weight used for a batch of `batch` images (see the class docstring)."""
        if not self.ref_batch:
            return self.weight
        return self.weight * batch / self.ref_batch

    def forward(self, student: Outputs, teacher: Outputs, batch: int) -> dict[str, torch.Tensor]:
        feats_s, feats_t = student.features, teacher.features
        if distributed.active() is not None:  # one rank's share: compare the global batch's images
            feats_s = [distributed.gather_batch(f) for f in feats_s]
            feats_t = [distributed.gather_batch(f) for f in feats_t]
            batch = feats_s[0].shape[0]
        return {"sp": self.weight_at(batch) * self.loss(feats_s, feats_t)}

    def raw(self, student: Outputs, teacher: Outputs) -> torch.Tensor | None:
        return self.loss(student.features, teacher.features) if self.pairs else None

    def knobs(self) -> dict[str, tuple[str, float]]:
        return {"sp": ("distill.sp_weight", self.weight)}
