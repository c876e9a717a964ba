"""Classic KD (Hinton, Vinyals & Dean, 2015): KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, optionally
on standardised logits (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024, arXiv:2403.01427): each logit vector z is replaced by its weighted
Z-score Z(z; T) = (z - mean(z)) / std(z) / T (their Algorithm 1: the population standard
deviation, 1/K over the K classes) before the softmax, for the teacher and the student alike
(Algorithm 2, the standardised softmax of section 4.3), and the KL is scaled by T^2 as in
Algorithm 2's objective. It frees the student from matching the teacher's logit shift (Eq. 11) and
variance (Eq. 12): only the logits' relations are distilled. Their released code divides by the
unbiased std + 1e-7; the paper's population std differs by sqrt(K / (K - 1)), a temperature rescale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spkd.models.methods.base import Method, Outputs, at_least_fp32, full_precision, register

STD_EPS = 1e-7  # added to the standard deviation: a constant logit vector stays finite


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row of (b, classes) logits: zero mean, population std 1 (Sun et al. 2024,
    Algorithm 1 without the base temperature, which kd_loss divides by as for plain KD)."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True, correction=0)
    return (logits - mean) / (std + STD_EPS)


def kd_loss(
    logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float, standardized: bool = False
) -> torch.Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (0-d, fp32+);
    `standardized`: on Z-scored logits (`standardize`, Sun et al. CVPR 2024).

    Inputs: (b, classes) logits. The T^2 factor keeps the gradient's scale independent of T
    (Hinton et al. 2015, section 2).
    """
    t = temperature
    with full_precision(logits_s.device):  # fp32 throughout, autocast or not
        z_s, z_t = at_least_fp32(logits_s), at_least_fp32(logits_t)
        if standardized:
            z_s, z_t = standardize(z_s), standardize(z_t)
        log_p_s = F.log_softmax(z_s / t, dim=1)
        log_p_t = F.log_softmax(z_t.to(log_p_s.dtype) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@register("kd")
class KD(Method):
    """`kd`: weight * kd_loss (spec: distill.kd_weight, distill.temperature,
    distill.kd_standardize)."""

    loss_names = ("kd",)
    needs_logits = True

    def __init__(self, weight: float = 0.0, temperature: float = 4.0, standardized: bool = False) -> None:
        super().__init__()
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.standardized = bool(standardized)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def forward(self, student: Outputs, teacher: Outputs, batch: int) -> dict[str, torch.Tensor]:
        assert student.logits is not None and teacher.logits is not None
        return {
            "kd": self.weight * kd_loss(student.logits, teacher.logits, self.temperature, self.standardized)
        }

    def raw(self, student: Outputs, teacher: Outputs) -> torch.Tensor | None:
        if student.logits is None or teacher.logits is None:
            return None
        return kd_loss(student.logits, teacher.logits, self.temperature, self.standardized)

    def knobs(self) -> dict[str, tuple[str, float]]:
        return {"kd": ("distill.kd_weight", self.weight)}
