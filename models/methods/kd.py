"""Classic KD (Hinton, Vinyals & Dean, 2015): KL(softmax(z_t/T) || softmax(z_s/T)) * T^2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.methods.base import Method, Outputs, at_least_fp32, full_precision, register


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (0-d, fp32+).

    Inputs: (b, classes) logits. The T^2 factor keeps the gradient's scale independent of T
    (Hinton et al. 2015, section 2).
    """
    t = temperature
    with full_precision(logits_s.device):  # fp32 throughout, autocast or not
        log_p_s = F.log_softmax(at_least_fp32(logits_s) / t, dim=1)
        log_p_t = F.log_softmax(at_least_fp32(logits_t).to(log_p_s.dtype) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@register("kd")
class KD(Method):
    """`kd`: weight * kd_loss (spec: distill.kd_weight, distill.temperature)."""

    loss_names = ("kd",)
    needs_logits = True

    def __init__(self, weight: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.temperature = float(temperature)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def forward(self, student: Outputs, teacher: Outputs, batch: int) -> dict[str, torch.Tensor]:
        assert student.logits is not None and teacher.logits is not None
        return {"kd": self.weight * kd_loss(student.logits, teacher.logits, self.temperature)}

    def raw(self, student: Outputs, teacher: Outputs) -> torch.Tensor | None:
        if student.logits is None or teacher.logits is None:
            return None
        return kd_loss(student.logits, teacher.logits, self.temperature)

    def knobs(self) -> dict[str, tuple[str, float]]:
        return {"kd": ("distill.kd_weight", self.weight)}
