"""One built model per role and job: validation, the data configs and every stage share it.

timm builds (and weight files load) once per job for its teacher and student; a stage
that trains or changes a model gets a deep copy of the built one (`ModelBank.copy`), so the
baseline and the distilled student start from the same initial weights as separate modules, and
the built model itself never changes.

Seeding: a model is built right after `checkpoint.seed_everything(seed, "init", role)` (its new
head is random), and `copy` leaves every RNG exactly as that seeded build did, so what a stage
draws next does not depend on whether the model was built now or earlier in the process.

Each job has its own bank: validation creates it (models/training/validation.py `ValidJob.models`)
and the run holds it (`Run.models`); `run_valid` (models/pipeline.py) clears it when the run ends.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spkd.common.spec import JobSpec
from spkd.models.networks import factory, weights
from spkd.models.training import checkpoint


@dataclass(frozen=True)
class ModelKey:
    """Everything a built model depends on; `stamp` names the weight file's version (size, mtime,
    inode), so a file replaced between two jobs is read again."""

    role: str  # "teacher" | "student": also the error field prefix and the seeding label
    name: str  # timm model name
    weights: str  # `hub` | `none` | `package` | a weight file path
    classes: tuple[str, ...]
    image_size: int
    seed: int
    stamp: str = ""

    @classmethod
    def of(cls, spec: JobSpec, role: str, classes: list[str], image_size: int) -> ModelKey:
        """The key of the job's `role` model ("teacher" | "student") for these classes and size."""
        section = getattr(spec, role)
        return cls(
            role,
            section.model,
            section.weights,
            tuple(classes),
            image_size,
            spec.train.seed,
            _stamp(section.weights),
        )


def _stamp(w: str) -> str:
    """'' for keyword weights, '-' for a missing file (weights.build raises for it)."""
    if w in ("hub", "none", "package") or w.startswith("job:"):
        return ""
    try:
        st = Path(w).stat()
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


@dataclass
class Built:
    """A model as built with its weights; never trained or moved (stages train copies)."""

    model: torch.nn.Module
    head_loaded: bool  # the classifier came from the weights (see weights.build)
    rng: dict[str, Any]  # Python, NumPy and torch CPU RNG states right after the seeded build


class ModelBank:
    """Built models by role, for one job: `initial` (shared, read-only), `copy` (to train),
    `probe` (for checks and data configs: never downloads)."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[ModelKey, Built]] = {}
        self._skeletons: dict[str, tuple[ModelKey, torch.nn.Module]] = {}

    def initial(self, key: ModelKey) -> Built:
        """The model of `key`, built on first use (weights.build; raises its SpkdError)."""
        held = self._built.get(key.role)
        if held is not None and held[0] == key:
            return held[1]
        self._built.pop(key.role, None)  # another job's model: drop it before building the next
        checkpoint.seed_everything(key.seed, "init", key.role)
        model, head = weights.build(
            key.name, key.weights, len(key.classes), key.role, key.image_size, list(key.classes)
        )
        rng = checkpoint.rng_state()
        rng.pop("cuda", None)  # a CPU build draws nothing from CUDA generators
        self._built[key.role] = (key, Built(model, head, rng))
        self._skeletons.pop(key.role, None)
        return self._built[key.role][1]

    def copy(self, key: ModelKey) -> tuple[torch.nn.Module, bool]:
        """(a separate module with the built weights, head_loaded); RNGs as after a seeded build."""
        built = self.initial(key)
        checkpoint.seed_everything(key.seed, "init", key.role)  # CUDA generators, as the build left them
        checkpoint.set_rng_state(built.rng)
        return _copy.deepcopy(built.model), built.head_loaded

    def probe(self, key: ModelKey) -> tuple[torch.nn.Module, bool]:
        """(model, head_loaded) to check and read the data config from, without changing it.

        `hub` weights are not downloaded here: a weightless model of the same architecture stands in
        (same data config, same layers) until a stage builds the real one.
        """
        held = self._built.get(key.role)
        if key.weights != "hub" or (held is not None and held[0] == key):
            built = self.initial(key)
            return built.model, built.head_loaded
        skeleton = self._skeletons.get(key.role)
        if skeleton is None or skeleton[0] != key:
            model = factory.create(
                key.name, len(key.classes), field=f"{key.role}.model", image_size=key.image_size
            )
            self._skeletons[key.role] = skeleton = (key, model)
        return skeleton[1], False

    def clear(self) -> None:
        """Forget every model (the job is over)."""
        self._built.clear()
        self._skeletons.clear()
