"""Epoch-end checkpoints: everything needed to resume a run and finish with identical weights.

One file, last.pt, written atomically (common.files.atomic_write) so a kill at any moment leaves
either the previous or the new checkpoint. It holds only tensors and plain Python values, so it
loads back with torch.load(weights_only=True).

Where: out_dir/checkpoints/. A service job runs each attempt in its own output folder (the
worker's core/attempts.py), which starts with hard links to the previous attempt's checkpoint, so
the engine itself knows nothing of attempts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spkd.common.files import atomic_write

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


def checkpoint_dir(out_dir: Path) -> Path:
    """The run's checkpoint folder: last.pt and the stages' weight files."""
    return Path(out_dir) / CHECKPOINT_DIR


def save(out_dir: Path, payload: dict[str, Any], guard: Callable[[], None] | None = None) -> Path:
    """Write last.pt atomically; `guard` may veto it right before the rename."""
    path = checkpoint_dir(out_dir) / LAST
    atomic_write(path, lambda tmp: torch.save(payload, tmp), guard)
    return path


def load(out_dir: Path) -> dict[str, Any] | None:
    """The saved payload of out_dir's last.pt, or None when there is none."""
    path = checkpoint_dir(out_dir) / LAST
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """random.setstate needs tuples; a serialised state may come back with lists."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def seed_everything(*parts: Any) -> None:
    """Seed every RNG from (seed, stage, epoch...): each epoch's randomness depends on nothing else."""
    seed = _stable_seed(parts)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stable_seed(parts) -> int:
    import hashlib

    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)
