"""Similarity-Preserving KD (Tung & Mori, ICCV 2019) and classic KD.

sp_loss follows the paper's per-layer term: Q = activations flattened to b x (c*h*w),
G = Q Q^T row-L2-normalised, loss = ||G_t - G_s||_F^2 / b^2. It only compares b x b
similarities, so the two layers may differ in channels, spatial size or even be token maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _full_precision(device: torch.device):
    """Autocast off: under autocast `q @ q.t()` would be cast back to bf16/fp16 (matmul is on
    autocast's lower-precision list), whatever the dtype of q."""
    return torch.autocast(device.type, enabled=False)


def similarity(features: torch.Tensor) -> torch.Tensor:
    """Row-normalised Gram matrix of a batch (b x b), in fp32 at least, autocast or not.

    In half types the Gram sum over c*h*w overflows (fp16: real lite features at 224 px give
    diagonals near 1.5e5) or loses precision (bf16), so it is computed in fp32 with autocast off.
    """
    with _full_precision(features.device):
        q = _at_least_fp32(features.reshape(features.shape[0], -1))
        return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The paper's SP term for one layer pair: ||G_t - G_s||_F^2 / b^2 (a 0-d tensor, fp32+).

    Inputs: (b, ...) activations of any shapes sharing b. Computed with autocast off, so it is
    the same number under bf16/fp16 mixed precision as in fp32. Raises ValueError on a b mismatch.
    """
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {f_s.shape[0]} vs {f_t.shape[0]}")
    b = f_s.shape[0]
    with _full_precision(f_s.device):
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


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    t = temperature
    with _full_precision(logits_s.device):  # fp32 throughout, autocast or not
        log_p_s = F.log_softmax(_at_least_fp32(logits_s) / t, dim=1)
        log_p_t = F.log_softmax(_at_least_fp32(logits_t).to(log_p_s.dtype) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


# A teacher as the distiller sees it: (normalised-or-raw batch, sample indices) -> (logits, features).
TeacherFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


class Distiller(nn.Module):
    """CE + sp_weight * SP (+ kd_weight * KD), mdistiller style: forward returns named losses.

    The teacher is a plain function so a cache of frozen-teacher features can stand in for it.
    `sp_ref_batch`: the batch size at which `sp_weight` applies. SP is ~1/b by construction
    (b x SP is nearly flat in b), so at another batch size b (the out-of-memory handler's halves,
    a short last batch) the weight used is sp_weight * b / sp_ref_batch: SP keeps its share.
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
    ) -> None:
        super().__init__()
        self.student_tap = student_tap
        self.teacher = teacher
        self.sp = SPLoss(layer_weights)
        self.sp_weight = sp_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.sp_ref_batch = sp_ref_batch

    def sp_weight_at(self, batch: int) -> float:
        """The SP weight used for a batch of `batch` images (see the class docstring)."""
        if not self.sp_ref_batch:
            return self.sp_weight
        return self.sp_weight * batch / self.sp_ref_batch

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None and (self.sp_weight > 0 or self.kd_weight > 0)

    def forward(
        self, x_s: torch.Tensor, x_t: torch.Tensor | None, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.student_tap(x_s)
        losses = {"ce": F.cross_entropy(out.logits.float(), labels)}
        if self.needs_teacher:
            t_logits, t_feats = self.teacher(x_t, indices)
            if self.sp_weight > 0:
                losses["sp"] = self.sp_weight_at(labels.shape[0]) * self.sp(out.features, t_feats)
            if self.kd_weight > 0:
                losses["kd"] = self.kd_weight * kd_loss(out.logits, t_logits, self.temperature)
        return out.logits, losses
