"""Relational KD (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019).

RKD transfers the STRUCTURE of a batch of embeddings rather than each embedding: the distances
between pairs and the angles in triplets. On the pooled pre-logits embeddings t_i (teacher) and
s_i (student), each (b, d) and possibly of different widths:

- distance potential, Eq. (3): psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu, with mu, Eq. (4), the mean
  distance over the pairs i != j of the batch (so the two embedding spaces' scales do not matter);
- distance loss, Eq. (5): L_D = sum over pairs of l_delta(psi_D(t_i, t_j), psi_D(s_i, s_j));
- l_delta, Eq. (6): the Huber loss with delta = 1 (torch's smooth L1);
- angle potential, Eq. (7): psi_A(t_i, t_j, t_k) = <e_ij, e_kj>, e_ij = (t_i - t_j) / ||t_i - t_j||;
- angle loss, Eq. (8): L_A = sum over triplets of l_delta(psi_A(t), psi_A(s));
- the objective, Eq. (9): L = CE + lambda_D L_D + lambda_A L_A, with lambda_D = 25, lambda_A = 50
  in the paper's metric-learning setup (and mdistiller's defaults).

As in the authors' code, the sums are means over all b^2 pairs (diagonal included, where both
potentials are 0) and all b^3 triplets (degenerate ones, with a zero difference, give 0).
Computed in fp32 with autocast off, like SP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.methods.base import POOLED, Method, Outputs, at_least_fp32, full_precision, register

EPS = 1e-12  # clamp on squared distances: sqrt stays differentiable away from 0


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """(b, b) Euclidean distances ||e_i - e_j||_2 of (b, d) rows, exactly 0 on the diagonal."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=EPS)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def distance_potential(e: torch.Tensor) -> torch.Tensor:
    """psi_D, Eq. (3)-(4): pairwise distances divided by their mean over the pairs i != j."""
    d = pairwise_distances(e)
    b = e.shape[0]
    mu = d.sum() / max(b * (b - 1), 1)
    return d / mu.clamp(min=EPS)


def angle_potential(e: torch.Tensor) -> torch.Tensor:
    """psi_A, Eq. (7): (b, b, b) cosines <e_ij, e_kj> at vertex j, with e_ij = normalise(e_i - e_j).

    Entry [j, i, k]; a zero difference (i == j or k == j) normalises to 0 and gives a cosine of 0.
    """
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = normalise(e_i - e_j)
    return torch.bmm(diff, diff.transpose(1, 2))


def _embeddings(x: torch.Tensor) -> torch.Tensor:
    return at_least_fp32(x.reshape(x.shape[0], -1))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """L_RKD-D, Eq. (5)-(6): mean Huber(psi_D(s), psi_D(t)) over the b^2 pairs (0-d, fp32+).

    Inputs (b, ...) flattened to (b, d); widths may differ. Raises ValueError on a b mismatch.
    """
    _same_batch(f_s, f_t)
    with full_precision(f_s.device):
        s = distance_potential(_embeddings(f_s))
        with torch.no_grad():
            t = distance_potential(_embeddings(f_t)).to(s.dtype)
        return F.smooth_l1_loss(s, t, reduction="mean")


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """L_RKD-A, Eq. (7)-(8): mean Huber(psi_A(s), psi_A(t)) over the b^3 triplets (0-d, fp32+).

    Memory: two (b, b, d) difference tensors and (b, b, b) cosines; fine for b <= a few hundred.
    """
    _same_batch(f_s, f_t)
    with full_precision(f_s.device):
        s = angle_potential(_embeddings(f_s))
        with torch.no_grad():
            t = angle_potential(_embeddings(f_t)).to(s.dtype)
        return F.smooth_l1_loss(s, t, reduction="mean")


def _same_batch(f_s: torch.Tensor, f_t: torch.Tensor) -> None:
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {f_s.shape[0]} vs {f_t.shape[0]}")


@register("rkd")
class RKD(Method):
    """`rkd`: distance_weight * L_RKD-D + angle_weight * L_RKD-A on the pooled embeddings.

    Spec: distill.methods.rkd {distance_weight: 25, angle_weight: 50} (the paper's lambdas).
    The teacher side is a fixed target (no gradient), as the teacher is frozen.
    """

    loss_names = ("rkd_distance", "rkd_angle")

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.pairs = [(POOLED, POOLED)]
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    @property
    def active(self) -> bool:
        return self.distance_weight > 0 or self.angle_weight > 0

    def forward(self, student: Outputs, teacher: Outputs, batch: int) -> dict[str, torch.Tensor]:
        (s,), (t,) = student.features, teacher.features
        out = {}
        if self.distance_weight > 0:
            out["rkd_distance"] = self.distance_weight * rkd_distance_loss(s, t)
        if self.angle_weight > 0:
            out["rkd_angle"] = self.angle_weight * rkd_angle_loss(s, t)
        return out

    def knobs(self) -> dict[str, tuple[str, float]]:
        field = "distill.methods.rkd"
        return {
            "rkd_distance": (f"{field}.distance_weight", self.distance_weight),
            "rkd_angle": (f"{field}.angle_weight", self.angle_weight),
        }
