"""`dataset.hf`: a `Dataset.save_to_disk` folder under the data root (the `dataset.path` rules),
or a Hugging Face hub name the worker downloads; either way turned once per host into an
ImageFolder (models/data/hub.py) under $HF_HOME/spkd-imagefolders, where the `datasets` library
keeps its own downloads too (a volume in docker-compose.yml)."""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from spkd.common.errors import SpkdError
from spkd.core import references
from spkd.core.settings import Settings
from spkd.core.source_checks import check_saved_dataset
from spkd.core.sources.base import Builders, Located, Source

HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")


def resolve_local(settings: Settings, name: str) -> Path | None:
    """`dataset.hf` -> a `save_to_disk` folder under the data root (the `dataset.path` rules), or
    None for a Hugging Face hub name (the worker downloads it). A folder of that name under the
    data root wins over the hub. Raises SpkdError `hub_datasets_disabled` (SPKD_HUB_DATASETS=false
    and no such folder), `dataset_path_not_allowed`, `invalid_dataset_name`."""
    try:
        return references.resolve_dataset_path(settings, name)
    except SpkdError as e:
        if e.code != "dataset_not_found":
            raise SpkdError(e.code, e.message.replace("dataset.path", "dataset.hf"), "dataset.hf") from e
    if not settings.hub_datasets:
        msg = (
            f"dataset.hf {name!r} is not a saved dataset under the server's data root, and this server "
            "does not download datasets (SPKD_HUB_DATASETS=false)"
        )
        raise SpkdError("hub_datasets_disabled", msg, "dataset.hf")
    if not HUB_NAME.fullmatch(name):
        raise SpkdError("invalid_dataset_name", f"{name!r} is not a Hugging Face dataset name", "dataset.hf")
    return None


def locate(where: Located, ds: Any) -> Path | None:
    """The saved dataset's folder (its layout, split and columns checked), or None for a hub name."""
    local = resolve_local(where.settings, ds.hf)
    if local is not None:
        check_saved_dataset(local, ds.hf, ds.split, ds.image_column, ds.label_column)
    return local


def materialise(
    where: Located, ds: Any, folder: Path | None, remote: Any, builders: Builders
) -> AbstractContextManager[Path]:
    """Its ImageFolder, built once per host from `folder` (a saved dataset) or the hub."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    built = builders.materialise(
        ds.hf, folder, home / "spkd-imagefolders", ds.revision, ds.split, ds.image_column, ds.label_column
    )
    return nullcontext(built)


SOURCE = Source("hf", locate, materialise)
