"""The logit methods against float64 re-derivations written out with loops: DIST (Huang et al.,
NeurIPS 2022) and KD on standardised logits (Sun et al., CVPR 2024); their spec options and a DIST
job end to end."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from spkd.common.reporter import RecordingReporter
from spkd.common.spec import METHOD_OPTIONS
from spkd.models import methods
from spkd.models.methods.base import Outputs
from spkd.models.methods.dist import DIST, dist_losses
from spkd.models.methods.kd import KD, kd_loss
from spkd.models.pipeline import run_job
from tests.helpers import tiny_job_spec


# ------------------------------------------------------------------- written out in float64
def _softmax_row(z: list, tau: float) -> list:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _pearson(u: list, v: list, eps: float = 1e-8) -> float:
    """rho_p(u, v), with the released code's eps added to the denominator (it matters only for a
    near-constant column: probabilities all near 0 at a low tau)."""
    n = len(u)
    mu, mv = sum(u) / n, sum(v) / n
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True))
    su = math.sqrt(sum((a - mu) ** 2 for a in u))
    sv = math.sqrt(sum((b - mv) ** 2 for b in v))
    return cov / (su * sv + eps)


def dist_reference(zs: list, zt: list, tau: float) -> tuple[float, float]:
    """Huang et al. section 3: L_inter = tau^2/B sum_i (1 - rho(Y_s[i], Y_t[i])), L_intra the same
    over the C columns; plain Python floats (IEEE double)."""
    ys = [_softmax_row(r, tau) for r in zs]
    yt = [_softmax_row(r, tau) for r in zt]
    b, c = len(ys), len(ys[0])
    inter = sum(1 - _pearson(ys[i], yt[i]) for i in range(b)) / b
    cols = lambda y, j: [y[i][j] for i in range(b)]  # noqa: E731
    intra = sum(1 - _pearson(cols(ys, j), cols(yt, j)) for j in range(c)) / c
    return tau * tau * inter, tau * tau * intra


def ls_kd_reference(zs: list, zt: list, tau: float) -> float:
    """Sun et al. Algorithm 1-2: Z(x; tau) = (x - mean) / std_population / tau, then
    tau^2 * KL(softmax Z(v) || softmax Z(z)), averaged over the batch."""

    def z(x):
        k = len(x)
        m = sum(x) / k
        s = math.sqrt(sum((a - m) ** 2 for a in x) / k)
        return [(a - m) / s for a in x]

    total = 0.0
    for rs, rt in zip(zs, zt, strict=True):
        ps, pt = _softmax_row(z(rs), tau), _softmax_row(z(rt), tau)
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    return tau * tau * total / len(zs)


def _logits(seed: int, b: int = 6, c: int = 5, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=gen) * scale, torch.randn(b, c, generator=gen) * 2 * scale


@pytest.mark.parametrize(("seed", "tau"), [(0, 1.0), (1, 4.0), (2, 0.5)])
def test_dist_matches_float64_reference(seed, tau):
    zs, zt = _logits(seed)
    want = dist_reference(zs.double().tolist(), zt.double().tolist(), tau)
    inter, intra = dist_losses(zs, zt, tau)  # fp32, the shipped code
    assert inter.dtype == torch.float32 and inter.dim() == 0
    assert inter.item() == pytest.approx(want[0], rel=1e-4) and intra.item() == pytest.approx(
        want[1], rel=1e-4
    )
    i64, j64 = dist_losses(zs.double(), zt.double(), tau)  # float64 through the same code: near-exact
    assert i64.item() == pytest.approx(want[0], rel=1e-6) and j64.item() == pytest.approx(want[1], rel=1e-6)


def test_dist_gradcheck_invariance_and_zero_at_the_teacher():
    zs, zt = (x.double() for x in _logits(3))
    s = zs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sum(dist_losses(x, zt, 1.0)), (s,))
    inter, intra = dist_losses(zt, zt, 1.0)
    assert inter.item() == pytest.approx(0, abs=1e-6) and intra.item() == pytest.approx(0, abs=1e-6)
    # the softmax ignores a per-row logit shift: so does the loss
    shifted = dist_losses(zs + torch.arange(6.0, dtype=torch.float64)[:, None], zt, 1.0)
    for a, b in zip(shifted, dist_losses(zs, zt, 1.0), strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        dist_losses(torch.randn(4, 3), torch.randn(4, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_logit_losses_are_fp32_under_autocast(dtype):
    zs, zt = _logits(4)
    with torch.autocast("cpu", dtype=dtype):
        got = dist_losses(zs, zt, 1.0)
        ls = kd_loss(zs, zt, 2.0, standardized=True)
    assert all(x.dtype == torch.float32 for x in got) and ls.dtype == torch.float32
    assert ls.item() == kd_loss(zs, zt, 2.0, standardized=True).item()


def test_dist_method_weights_its_named_losses():
    zs, zt = _logits(5)
    m = methods.create("dist", {"beta": 2.0, "gamma": 0.5})
    assert isinstance(m, DIST) and m.needs_logits and m.pairs == []
    got = m(Outputs(zs, []), Outputs(zt, []), 6)
    inter, intra = dist_losses(zs, zt, 1.0)
    assert got["dist_inter"].item() == pytest.approx(2 * inter.item())
    assert got["dist_intra"].item() == pytest.approx(0.5 * intra.item())
    assert set(methods.create("dist", {"gamma": 0.0})(Outputs(zs, []), Outputs(zt, []), 6)) == {"dist_inter"}
    assert not methods.create("dist", {"beta": 0.0, "gamma": 0.0}).active
    assert m.knobs()["dist_intra"] == ("distill.methods.dist.gamma", 0.5)


@pytest.mark.parametrize(("seed", "tau"), [(0, 1.0), (6, 2.0), (7, 4.0)])
def test_standardized_kd_matches_float64_reference(seed, tau):
    zs, zt = _logits(seed)
    want = ls_kd_reference(zs.double().tolist(), zt.double().tolist(), tau)
    assert kd_loss(zs, zt, tau, standardized=True).item() == pytest.approx(want, rel=1e-4)
    assert kd_loss(zs.double(), zt.double(), tau, standardized=True).item() == pytest.approx(want, rel=1e-6)
    # the point of it: a student at the teacher's relations but another scale and shift costs ~0
    assert kd_loss(0.1 * zt + 5, zt, tau, standardized=True).item() == pytest.approx(0, abs=1e-5)
    assert kd_loss(0.1 * zt + 5, zt, tau).item() > 0.01  # plain KD makes it match the scale
    s = zs.double().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, zt.double(), tau, standardized=True), (s,))


def test_standardized_is_off_by_default_and_set_from_the_spec():
    zs, zt = _logits(8)
    assert kd_loss(zs, zt, 4.0).item() == KD(1.0, 4.0)(Outputs(zs, []), Outputs(zt, []), 6)["kd"].item()
    spec = tiny_job_spec(distill={"kd_weight": 1.0, "kd_standardize": True, "methods": {"dist": None}})
    built = methods.from_spec(spec.distill, ["auto"], ["auto"], [1.0], 1.0, 1.0, 16)
    kd = next(m for m in built if isinstance(m, KD))
    assert kd.standardized and kd(Outputs(zs, []), Outputs(zt, []), 6)["kd"].item() == pytest.approx(
        kd_loss(zs, zt, 4.0, standardized=True).item()
    )
    assert any(isinstance(m, DIST) and (m.beta, m.gamma, m.tau) == (1.0, 1.0, 1.0) for m in built)
    assert not tiny_job_spec().distill.kd_standardize


def test_dist_spec_options_are_checked():
    assert "dist" in METHOD_OPTIONS and set(METHOD_OPTIONS) <= set(methods.known())
    with pytest.raises(pydantic.ValidationError, match="dist.tau"):
        tiny_job_spec(distill={"methods": {"dist": {"tau": 0}}})
    with pytest.raises(pydantic.ValidationError, match="dist.alpha"):
        tiny_job_spec(distill={"methods": {"dist": {"alpha": 1}}})


def test_dist_job_end_to_end(color_dataset, tmp_path):
    spec = tiny_job_spec(
        distill={"sp_weight": 0, "methods": {"dist": {}}},
        teacher={"finetune": {"epochs": 1}},
        train={"epochs": 1},
        baseline=False,
    )
    metrics = run_job(spec, color_dataset, tmp_path, RecordingReporter())
    row = metrics["curves"]["distill"][-1]
    assert row["dist_inter"] > 0 and row["dist_intra"] > 0 and math.isfinite(row["dist_intra"])
    assert metrics["spec"]["distill"]["methods"] == {"dist": {"beta": 1.0, "gamma": 1.0, "tau": 1.0}}
