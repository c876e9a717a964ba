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

from collections.abc import Callable

import torch
import torch.nn.functional as F

from spkd.models.methods.base import POOLED, Method, Outputs, at_least_fp32, full_precision, register

EPS = 1e-12  # clamp on squared distances: sqrt stays differentiable away from 0


def _centred_gram(e: torch.Tensor) -> torch.Tensor:
    """(b, b) Gram matrix of the rows of e minus their mean.

    Both potentials are invariant to translating the batch, and centring first keeps the Gram
    identities below from cancelling catastrophically when the rows share a large common part
    (post-ReLU pooled features are all positive).
    """
    c = e - e.mean(dim=0, keepdim=True)
    return c @ c.t()


def _distances(g: torch.Tensor) -> torch.Tensor:
    """(b, b) Euclidean distances from a Gram matrix, ||e_i - e_j||^2 = G_ii + G_jj - 2 G_ij,
    exactly 0 on the diagonal (clamped at EPS before the square root elsewhere)."""
    sq = g.diagonal()
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * g).clamp(min=EPS)
    eye = torch.eye(g.shape[0], dtype=torch.bool, device=g.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """(b, b) Euclidean distances ||e_i - e_j||_2 of (b, d) rows, exactly 0 on the diagonal."""
    return _distances(_centred_gram(e))


def distance_potential(e: torch.Tensor) -> torch.Tensor:
    """psi_D, Eq. (3)-(4): pairwise distances divided by their mean over the pairs i != j."""
    d = pairwise_distances(e)
    b = e.shape[0]
    mu = d.sum() / max(b * (b - 1), 1)
    return d / mu.clamp(min=EPS)


def angle_potential(e: torch.Tensor) -> torch.Tensor:
    """psi_A, Eq. (7): (b, b, b) cosines <e_ij, e_kj> at vertex j, with e_ij = normalise(e_i - e_j).

    Entry [j, i, k]; a zero difference (i == j or k == j) gives a cosine of 0. From the Gram matrix:
    <e_i - e_j, e_k - e_j> = G_ik - G_ij - G_jk + G_jj, over ||e_i - e_j|| ||e_k - e_j||, so the cost
    is O(b^2 d + b^3) rather than the O(b^3 d) of forming every difference vector.
    """
    g = _centred_gram(e)
    d = _distances(g)
    diag = g.diagonal()
    dots = g.unsqueeze(0) - g.unsqueeze(2) - g.unsqueeze(1) + diag.view(-1, 1, 1)  # [j, i, k]
    norms = d.unsqueeze(2) * d.unsqueeze(1)  # [j, i, k] = ||e_i - e_j|| ||e_k - e_j||
    cos = dots / norms.clamp(min=EPS)
    return torch.where(norms > 0, cos, torch.zeros_like(cos))


def _embeddings(x: torch.Tensor) -> torch.Tensor:
    return at_least_fp32(x.reshape(x.shape[0], -1))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """L_RKD-D, Eq. (5)-(6): mean Huber(psi_D(s), psi_D(t)) over the b^2 pairs (0-d, fp32+).

    Inputs (b, ...) flattened to (b, d); widths may differ. Raises ValueError on a b mismatch.
    """
    return _relational_loss(distance_potential, f_s, f_t)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """L_RKD-A, Eq. (7)-(8): mean Huber(psi_A(s), psi_A(t)) over the b^3 triplets (0-d, fp32+).

    Memory: a few (b, b, b) tensors (b = 256: 64 MiB each in fp32).
    """
    return _relational_loss(angle_potential, f_s, f_t)


def _relational_loss(
    potential: Callable[[torch.Tensor], torch.Tensor], f_s: torch.Tensor, f_t: torch.Tensor
) -> torch.Tensor:
    """Eq. (6) over a potential: mean Huber(potential(s), potential(t)), in fp32 or wider, with no
    gradient through the teacher's side."""
    _same_batch(f_s, f_t)
    with full_precision(f_s.device):
        s = potential(_embeddings(f_s))
        with torch.no_grad():
            t = potential(_embeddings(f_t)).to(s.dtype)
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
