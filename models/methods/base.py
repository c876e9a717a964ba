"""The base of a distillation method and the registry that finds one by name.

A method is one small `nn.Module` (mdistiller style): it declares what it needs from the teacher and
the student (feature pairs at named taps, logits), and `forward` returns a dict of NAMED losses,
already weighted. Learnable parts (a projection head...) are ordinary submodules: the engine adds
`parameters()` to the student's optimizer and saves `state_dict()` in every checkpoint.
Adding a method: one file in this package with `@register("name")` and its options in the job spec
(common/spec.py METHOD_OPTIONS); see docs/architecture.md, "A distillation method".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from spkd.common.errors import SpkdError
from spkd.models.networks.features import AUTO, POOLED  # taps a method may name besides feature_info modules

__all__ = ["AUTO", "POOLED", "Method", "Outputs", "create", "get", "known", "register", "unregister"]


@dataclass
class Outputs:
    """One model's outputs as a method sees them: logits (b, classes) or None, and one feature
    tensor (b, ...) per pair the method declared, in its `pairs` order."""

    logits: torch.Tensor | None
    features: list[torch.Tensor]


class Method(nn.Module):
    """One distillation method. Subclasses set the class attributes and implement `forward`.

    name: the registry name; loss_names: the keys `forward` returns (rows, metrics, report);
    needs_logits: whether `forward` reads logits; pairs: (teacher tap, student tap) per feature pair
    it reads (set in __init__). `active` is False while every weight is 0 (the method is skipped).
    """

    name: ClassVar[str] = ""
    loss_names: ClassVar[tuple[str, ...]] = ()
    needs_logits: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[str, str]] = []

    @property
    def active(self) -> bool:
        return True

    def forward(self, student: Outputs, teacher: Outputs, batch: int) -> dict[str, torch.Tensor]:
        """Named, weighted 0-d losses for a batch of `batch` images."""
        raise NotImplementedError

    def raw(self, student: Outputs, teacher: Outputs) -> torch.Tensor | None:
        """The unweighted term `auto` weights are measured on; None: the method has no auto weight."""
        return None

    def knobs(self) -> dict[str, tuple[str, float]]:
        """loss name -> (spec field, weight now): what a non-finite-loss error tells the user to lower."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: `@register("rkd")` makes the method findable by `get("rkd")`."""

    def add(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a distillation method named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def unregister(name: str) -> None:
    """Remove a method (tests register throw-away ones)."""
    _REGISTRY.pop(name, None)


def known() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as `name`; raises SpkdError `unknown_method` listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpkdError(
            "unknown_method",
            f"unknown distillation method {name!r}; known methods: {', '.join(known())}",
            "distill.methods",
        ) from None


def create(name: str, options: Mapping[str, object]) -> Method:
    """An instance of method `name` built with its spec options (keyword arguments)."""
    return get(name)(**dict(options))


def full_precision(device: torch.device):
    """Autocast off: losses are computed in fp32 at least, whatever the mixed precision."""
    return torch.autocast(device.type, enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
