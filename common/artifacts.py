"""The names of a job's model artifacts, and the one reader of the layout that came before them.

A job stores each model once, as a folder in timm's hub layout (models/results/export.py
`save_hub_folder`): `student/` (the student that ships), the other student under its own name
(`distilled/` or `baseline/`), and `teacher/`, each holding `model.safetensors`, `config.json`
(architecture, num_classes, `label_names`, the preprocessing) and `README.md`.

Jobs exported before that (the old layout) also hold flat copies: `<name>.safetensors` with a JSON
model card `<name>.json` (`class_names`, ...) beside it, and the oldest ones only those.
`role_weights_names` and `class_names_beside` read both layouts, the hub folder first, so such a
job still serves as `weights: job:<id>` and its head's classes are still checked; `legacy_files`
lets `spkd download JOB student` fetch its flat copies. Torch-free: the resolver
(core/references.py), the workers, the engine and the CLI all use it.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"  # timm's hub layout
CONFIG_FILE = "config.json"
MODEL_ROLES = ("teacher", "student")  # what `weights: job:<id>` can take from a job


def weights_name(folder: str) -> str:
    """The artifact name of a model folder's weights: `student` -> `student/model.safetensors`."""
    return f"{folder}/{WEIGHTS_FILE}"


def role_weights_names(role: str) -> tuple[str, ...]:
    """The artifact names a job's `role` (teacher or student) weights may have, newest layout
    first: `<role>/model.safetensors`, then the old layout's flat `<role>.safetensors`."""
    return (weights_name(role), legacy_weights_name(role))


def class_names_beside(weights: Path) -> list[str] | None:
    """The class names a weight file's head was trained on, from the JSON beside it, or None.

    A hub folder's `model.safetensors` -> `config.json` `label_names`; any other `x.safetensors`
    (the old layout's flat copies, or an operator's own file) -> `x.json` `class_names` (the model
    card the old layout wrote). None when there is no such file, it is not JSON, or it has no list
    of strings under that key."""
    if weights.name == WEIGHTS_FILE:
        sidecar, key = weights.with_name(CONFIG_FILE), "label_names"
    else:
        sidecar, key = weights.with_suffix(".json"), "class_names"
    try:
        data = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    except (OSError, ValueError):
        return None
    names = data.get(key) if isinstance(data, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def sidecar_name(name: str) -> str:
    """The artifact that names the classes of the weights artifact `name` (see class_names_beside):
    `teacher/model.safetensors` -> `teacher/config.json`, `teacher.safetensors` -> `teacher.json`."""
    path = Path(name)
    sidecar = path.with_name(CONFIG_FILE) if path.name == WEIGHTS_FILE else path.with_suffix(".json")
    return sidecar.as_posix()


# ---------------------------------------------------------------- the old layout (read only)
def legacy_files(folder: str) -> tuple[str, str]:
    """The old layout's flat copies of a model folder's files: `student` -> (`student.safetensors`,
    `student.json`). No longer written; still read from jobs exported before the hub folders were
    the one format."""
    return f"{folder}.safetensors", f"{folder}.json"


def legacy_weights_name(role: str) -> str:
    """The old layout's flat weights of a model (`teacher.safetensors`), see legacy_files."""
    return legacy_files(role)[0]
