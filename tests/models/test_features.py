"""Feature taps on real timm models: a CNN teacher and a ViT student, auto and named layers."""

from __future__ import annotations

import pytest
import timm
import torch

from spkd.common.errors import SpkdError
from spkd.models.methods.sp import sp_loss
from spkd.models.networks.features import FeatureTap, layer_names


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3).eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3).eval()


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_auto_is_the_map_before_pooling_and_logits_match_forward(cnn):
    x = torch.randn(4, 3, 64, 64)
    out = FeatureTap(cnn, ["auto"])(x)
    with torch.no_grad():
        assert torch.allclose(out.logits, cnn(x), atol=1e-5)
    (feat,) = out.features
    assert feat.dim() == 4 and feat.shape[:2] == (4, cnn.num_features)  # b x c x h x w, not pooled


def test_vit_auto_taps_tokens(vit):
    x = torch.randn(3, 3, 160, 160)
    out = FeatureTap(vit, ["auto"])(x)
    assert out.features[0].dim() == 3  # b x tokens x dim: SP flattens it
    with torch.no_grad():
        assert torch.allclose(out.logits, vit(x), atol=1e-5)


@pytest.mark.parametrize("use_intermediates", [True, False])
def test_named_layers_one_forward_pass(cnn, use_intermediates):
    names = layer_names(cnn)
    assert names[0] == "auto" and "layer3" in names or len(names) > 2
    chosen = [names[-2], "auto", names[-1]]
    tap = FeatureTap(cnn, chosen, use_intermediates=use_intermediates)
    stem_calls = _count_calls(cnn.conv1 if hasattr(cnn, "conv1") else next(cnn.modules()))
    x = torch.randn(2, 3, 64, 64)
    out = tap(x)
    assert stem_calls[0] == 1  # one pass gives every tap and the logits
    with torch.no_grad():
        _, inter = cnn.forward_intermediates(x)
        assert torch.allclose(out.logits, cnn(x), atol=1e-5)
    by_name = dict(zip(names[1:], inter, strict=True))
    assert torch.allclose(out.features[0], by_name[chosen[0]], atol=1e-5)
    assert torch.allclose(out.features[2], by_name[chosen[2]], atol=1e-5)
    tap.close()


def test_wrong_layer_name_lists_valid_names(cnn):
    with pytest.raises(SpkdError) as err:
        FeatureTap(cnn, ["layer9"], field="distill.layers.teacher")
    assert err.value.code == "unknown_layer"
    assert err.value.field == "distill.layers.teacher"
    for name in layer_names(cnn):
        assert name in err.value.message


def test_sp_between_cnn_teacher_and_vit_student(cnn, vit):
    x_t, x_s = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 160, 160)
    vit.train()
    t = FeatureTap(cnn, [layer_names(cnn)[-1]])(x_t)
    s = FeatureTap(vit, [layer_names(vit)[-1], "auto"])(x_s)
    loss = sp_loss(s.features[0], t.features[0]) + sp_loss(s.features[1], t.features[0])
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vit.parameters())
    vit.zero_grad()
    vit.eval()
