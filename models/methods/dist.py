"""DIST (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS
2022, arXiv:2205.10536): match the teacher's *relations* rather than its exact probabilities.

With Y = softmax(z / tau) row-wise for a batch of B images and C classes (student Y_s, teacher
Y_t), and the Pearson distance d_p(u, v) = 1 - rho_p(u, v), rho_p = Cov(u, v) / (Std(u) Std(v)):

- inter-class relation (per image, across classes): L_inter = tau^2 / B * sum_i d_p(Y_s[i,:], Y_t[i,:])
- intra-class relation (per class, across images):  L_intra = tau^2 / C * sum_j d_p(Y_s[:,j], Y_t[:,j])
- L_DIST = beta * L_inter + gamma * L_intra, beta = gamma = 1, tau = 1 (the paper's ImageNet setting).

Section 3.2-3.3 of the paper (the Pearson distance, the inter- and intra-class losses and their
sum); the tau^2 factor and the eps in the denominator (1e-8) are those of the authors' released
code (hunto/image_classification_sota, lib/models/losses/dist_kd.py). Equation numbers were not
checked against the paper's text here: cite the sections. Being a correlation, the loss is
invariant to a positive affine map of either probability row or column, so a student that cannot
reach the teacher's confidence is not pushed to; the intra-class term needs B >= 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spkd.models.methods.base import Method, Outputs, at_least_fp32, full_precision, register

EPS = 1e-8


def pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - Pearson correlation of a's and b's rows (both (n, m)): 0-d."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    rho = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)
    return (1 - rho).mean()


def dist_losses(
    logits_s: torch.Tensor, logits_t: torch.Tensor, tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_inter, L_intra), each 0-d in fp32 at least, both scaled by tau^2. Inputs: (B, C) logits;
    the teacher side is a fixed target (no gradient). Raises ValueError for mismatched shapes."""
    if logits_s.shape != logits_t.shape or logits_s.ndim != 2:
        raise ValueError(
            f"DIST needs (B, C) logits of one shape: {tuple(logits_s.shape)} vs {tuple(logits_t.shape)}"
        )
    with full_precision(logits_s.device):
        y_s = F.softmax(at_least_fp32(logits_s) / tau, dim=1)
        with torch.no_grad():
            y_t = F.softmax(at_least_fp32(logits_t).to(y_s.dtype) / tau, dim=1)
        scale = tau * tau
        return scale * pearson_distance(y_s, y_t), scale * pearson_distance(y_s.t(), y_t.t())


@register("dist")
class DIST(Method):
    """`dist`: beta * L_inter + gamma * L_intra on the logits (spec: distill.methods.dist
    {beta: 1, gamma: 1, tau: 1}); logged as `dist_inter` and `dist_intra`."""

    loss_names = ("dist_inter", "dist_intra")
    needs_logits = True

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)

    @property
    def active(self) -> bool:
        return self.beta > 0 or self.gamma > 0

    def forward(self, student: Outputs, teacher: Outputs, batch: int) -> dict[str, torch.Tensor]:
        assert student.logits is not None and teacher.logits is not None
        inter, intra = dist_losses(student.logits, teacher.logits, self.tau)
        out = {}
        if self.beta > 0:
            out["dist_inter"] = self.beta * inter
        if self.gamma > 0:
            out["dist_intra"] = self.gamma * intra
        return out

    def knobs(self) -> dict[str, tuple[str, float]]:
        field = "distill.methods.dist"
        return {"dist_inter": (f"{field}.beta", self.beta), "dist_intra": (f"{field}.gamma", self.gamma)}
