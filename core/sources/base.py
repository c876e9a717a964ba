"""What every dataset source module provides (core/sources/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

from spkd.core import store
from spkd.core.settings import Settings


@dataclass(frozen=True)
class Located:
    """What resolving a source may read: the job store, the server's settings, and whose job it is
    (a spec reaches only its owner's uploads)."""

    r: redis.Redis
    keys: store.Keys
    settings: Settings
    owner: str


class Builders(Protocol):
    """The engine's ImageFolder builders (models/data/hub.py), handed in by the worker."""

    def materialise(
        self,
        source: str,
        local: Path | None,
        cache: Path,
        revision: str | None,
        split: str | None,
        image_col: str,
        label_col: str,
    ) -> Path: ...

    def materialise_torchvision(self, name: str, home: Path, split: str | None = None) -> Path: ...


@dataclass(frozen=True)
class Source:
    """One kind of dataset source: the `dataset` field that names it, its checks (`locate`: the
    folder, or None when the worker builds it) and its run-time folder (`materialise`)."""

    field: str
    locate: Callable[[Located, Any], Path | None]
    materialise: Callable[[Located, Any, Path | None, Any, Builders], AbstractContextManager[Path]]
