"""SP and KD losses against an independent float64 re-derivation, gradients and invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spkd.models.methods.kd import kd_loss
from spkd.models.methods.sp import SPLoss, similarity, sp_loss


def sp_reference(f_s: np.ndarray, f_t: np.ndarray) -> float:
    """The paper's formula, written out in float64 NumPy with explicit steps."""
    b = f_s.shape[0]

    def gram(f):
        q = f.reshape(b, -1).astype(np.float64)
        g = q @ q.T
        return g / np.sqrt((g**2).sum(axis=1, keepdims=True))

    return float(((gram(f_t) - gram(f_s)) ** 2).sum() / b**2)


SHAPES = [
    ((8, 16, 4, 4), (8, 32, 7, 7)),  # different channels and spatial sizes
    ((6, 24, 3, 3), (6, 8, 9, 9)),
    ((5, 17, 64), (5, 40, 2, 2)),  # ViT token map vs CNN map
    ((4, 10), (4, 300)),  # already flat
]


@pytest.mark.parametrize(("shape_s", "shape_t"), SHAPES)
def test_sp_matches_float64_reference(shape_s, shape_t):
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(shape_s, generator=gen)
    f_t = torch.randn(shape_t, generator=gen).relu()  # post-ReLU maps, like real CNN features
    got = sp_loss(f_s, f_t)
    assert got.dim() == 0
    assert got.item() == pytest.approx(sp_reference(f_s.numpy(), f_t.numpy()), rel=1e-5, abs=1e-9)
    # and in float64 the match is near-exact
    assert sp_loss(f_s.double(), f_t.double()).item() == pytest.approx(
        sp_reference(f_s.numpy(), f_t.numpy()), rel=1e-12
    )


def test_sp_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    f_s = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    f_t = torch.randn(5, 4, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(sp_loss, (f_s, f_t))


@pytest.mark.parametrize("scale", [0.01, 3.0, 1000.0])
def test_sp_invariant_to_positive_rescaling(scale):
    gen = torch.Generator().manual_seed(2)
    f_s = torch.randn(7, 12, 4, 4, dtype=torch.float64, generator=gen)
    f_t = torch.randn(7, 20, 2, 2, dtype=torch.float64, generator=gen)
    base = sp_loss(f_s, f_t)
    assert sp_loss(scale * f_s, f_t).item() == pytest.approx(base.item(), rel=1e-10)
    assert sp_loss(f_s, scale * f_t).item() == pytest.approx(base.item(), rel=1e-10)


def test_sp_is_zero_when_student_equals_teacher():
    f = torch.randn(9, 8, 5, 5)
    assert sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert sp_loss(f, 4.0 * f).item() == pytest.approx(0.0, abs=1e-10)
    assert sp_loss(f, torch.randn(9, 8, 5, 5)).item() > 1e-4


def test_sp_half_precision_inputs_stay_finite():
    f_s = (torch.randn(8, 64, 7, 7) * 50).bfloat16()
    f_t = (torch.randn(8, 128, 7, 7) * 50).bfloat16()
    out = sp_loss(f_s, f_t)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(sp_loss(f_s.float(), f_t.float()).item(), rel=1e-4)


def test_sp_rejects_batch_mismatch():
    with pytest.raises(ValueError, match="batch sizes"):
        sp_loss(torch.randn(4, 3), torch.randn(5, 3))


def test_sp_module_sums_weighted_pairs():
    gen = torch.Generator().manual_seed(3)
    s = [torch.randn(6, 8, 4, 4, generator=gen), torch.randn(6, 16, 2, 2, generator=gen)]
    t = [torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 32, 1, 1, generator=gen)]
    got = SPLoss([0.5, 2.0])(s, t)
    want = 0.5 * sp_reference(s[0].numpy(), t[0].numpy()) + 2.0 * sp_reference(s[1].numpy(), t[1].numpy())
    assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        SPLoss([1.0])(s, t)


def kd_reference(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    def log_softmax(x):
        x = x / temp
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp_s, lp_t = log_softmax(s.astype(np.float64)), log_softmax(t.astype(np.float64))
    return float((np.exp(lp_t) * (lp_t - lp_s)).sum(axis=1).mean() * temp**2)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_matches_reference_and_gradcheck(temp):
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert kd_loss(s, t, temp).item() == pytest.approx(
        kd_reference(s.detach().numpy(), t.numpy(), temp), rel=1e-5
    )
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, temp).double(), (s,), atol=1e-4)


# ------------------------------------------------------------------ mixed precision (autocast)
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _sp64(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[float, torch.Tensor]:
    """SP and d SP / d f_s in float64, outside autocast: the reference."""
    s = f_s.detach().double().requires_grad_(True)
    loss = sp_loss(s, f_t.detach().double())
    loss.backward()
    return loss.item(), s.grad


def _sp_autocast(f_s: torch.Tensor, f_t: torch.Tensor, dtype: torch.dtype):
    s = f_s.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = sp_loss(s, f_t)
    loss.backward()
    return loss, s.grad


def _check_against_float64(f_s, f_t, dtype, rel=1e-4):
    """Under autocast: the fp32 value and gradient exactly, and float64's within `rel`."""
    want, want_grad = _sp64(f_s, f_t)
    got, grad = _sp_autocast(f_s, f_t, dtype)
    assert got.dtype == torch.float32 and torch.isfinite(got) and torch.isfinite(grad).all()
    plain = f_s.detach().clone().requires_grad_(True)
    fp32 = sp_loss(plain, f_t)
    fp32.backward()
    assert got.item() == fp32.item() and torch.equal(grad, plain.grad)  # autocast changes nothing
    assert got.item() == pytest.approx(want, rel=rel, abs=1e-12)
    scale = want_grad.abs().max().item()
    assert (grad.double() - want_grad).abs().max().item() <= rel * scale


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("layer", ["auto", "blocks.6"])
def test_sp_under_autocast_matches_float64_on_real_lite_features(lite_features, dtype, layer):
    f_s, f_t = lite_features["student"][layer], lite_features["teacher"][layer]
    _check_against_float64(f_s, f_t, dtype)
    # student close to the teacher: SP is tiny (G_t - G_s cancels), a half-precision Gram would be
    # all error; fp32 itself keeps ~2 digits of float64 there
    near = f_t + 0.01 * torch.randn(f_t.shape, generator=torch.Generator().manual_seed(0))
    _check_against_float64(near, f_t, dtype, rel=3e-2)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
def test_sp_under_autocast_matches_float64_on_random_features(dtype):
    gen = torch.Generator().manual_seed(5)
    f_s = torch.randn(16, 64, 6, 6, generator=gen).relu()
    f_t = torch.randn(16, 96, 3, 3, generator=gen).relu()
    _check_against_float64(f_s, f_t, dtype)
    # large activations (fp16 Gram diagonals above 65504 are inf): fp32 inside, so finite
    _check_against_float64(40 * f_s, 40 * f_t, dtype)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
def test_similarity_is_fp32_under_autocast(dtype):
    with torch.autocast("cpu", dtype=dtype):
        g = similarity(torch.randn(4, 8, 3, 3))
    assert g.dtype == torch.float32


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
def test_kd_under_autocast_matches_float64(dtype):
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(8, 10, generator=gen) * 5
    t = torch.randn(8, 10, generator=gen) * 5
    want = kd_reference(s.numpy(), t.numpy(), 4.0)
    s_grad = s.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        got = kd_loss(s_grad, t, 4.0)
    got.backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)
    ref = s.double().requires_grad_(True)
    kd_loss(ref, t.double(), 4.0).backward()
    assert torch.allclose(s_grad.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)
