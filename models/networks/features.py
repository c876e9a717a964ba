"""Feature taps for SP: one forward pass per model per step gives logits and the chosen features.

`auto` taps the last stage's feature map before pooling (`forward_features`), as in the paper and
its reference code; for a ViT that is the token map (b x tokens x dim), which SP handles because it
only compares b x b similarities. Named taps are `feature_info` module names (e.g. `blocks.6`),
read with `forward_intermediates` when the model has it, else with forward hooks. `pooled` is the
pooled pre-logits embedding (b x d, timm's `forward_head(pre_logits=True)`), which RKD compares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from spkd.common.errors import SpkdError

if TYPE_CHECKING:
    from spkd.common.spec import JobSpec

AUTO = "auto"
POOLED = "pooled"  # the pooled pre-logits embedding; valid for any timm classifier


def layer_pairs(spec: JobSpec) -> tuple[list[str], list[str], list[float]]:
    """(teacher layers, student layers, per-pair weights) that SP compares: `auto` is one pair."""
    if spec.distill.layers == AUTO:
        return [AUTO], [AUTO], [1.0]
    pairs = spec.distill.layers
    return [p.teacher for p in pairs], [p.student for p in pairs], [p.weight for p in pairs]


def layer_names(model: torch.nn.Module) -> list[str]:
    """Valid tap names: 'auto' plus the model's feature_info module names."""
    info = getattr(model, "feature_info", None) or []
    return [AUTO] + [entry["module"] for entry in info if entry.get("module")]


def check_layers(model: torch.nn.Module, names: Sequence[str], field: str) -> None:
    valid = layer_names(model)
    for name in names:
        if name not in valid and name != POOLED:
            raise SpkdError(
                "unknown_layer",
                f"{type(model).__name__} has no feature layer {name!r}; valid: {', '.join(valid)}",
                field,
            )


@dataclass
class Tapped:
    logits: torch.Tensor
    features: list[torch.Tensor]  # in the order of the requested names


class FeatureTap:
    """Wraps a timm model: `tap(x)` -> logits + the features named at construction."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str],
        field: str = "layers",
        use_intermediates: bool | None = None,
    ) -> None:
        """`use_intermediates`: None = when the model has forward_intermediates; False = hooks."""
        check_layers(model, names, field)
        self.model = model
        self.names = list(names)
        modules = layer_names(model)[1:]
        self._indices = {n: modules.index(n) for n in self.names if n not in (AUTO, POOLED)}
        has_api = hasattr(model, "forward_intermediates")
        self._use_intermediates = bool(self._indices) and has_api and use_intermediates is not False
        self._hooked: dict[str, torch.Tensor] = {}
        self._handles = []
        if self._indices and not self._use_intermediates:
            for name in self._indices:
                self._handles.append(model.get_submodule(name).register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def store(_module, _inputs, output):
            self._hooked[name] = output

        return store

    def __call__(self, x: torch.Tensor) -> Tapped:
        if self._use_intermediates:
            order = sorted(set(self._indices.values()))
            final, inter = self.model.forward_intermediates(x, indices=order)
            by_index = dict(zip(order, inter, strict=True))
            found = {n: by_index[i] for n, i in self._indices.items()}
        else:
            final = self.model.forward_features(x)
            found = dict(self._hooked)
            self._hooked.clear()
        logits = self.model.forward_head(final)
        if POOLED in self.names:
            found[POOLED] = self.model.forward_head(final, pre_logits=True)
        feats = [final if n == AUTO else found[n] for n in self.names]
        return Tapped(logits=logits, features=feats)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
