"""`dataset.torchvision`: a torchvision dataset, downloaded by the worker and turned into an
ImageFolder under $TORCH_HOME/spkd-imagefolders (models/data/hub.py); the archives stay under
$TORCH_HOME/spkd-downloads (a volume in docker-compose.yml)."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from spkd.common.errors import SpkdError
from spkd.core.settings import Settings
from spkd.core.source_checks import check_torchvision_split
from spkd.core.sources.base import Builders, Located, Source


def check_allowed(settings: Settings, name: str) -> None:
    """Downloads (FakeData excepted) are refused up front with `hub_datasets_disabled` on a server
    without internet (SPKD_HUB_DATASETS=false)."""
    if name != "FakeData" and not settings.hub_datasets:
        msg = (
            f"dataset.torchvision {name!r} is downloaded by the worker, and this server does not "
            "download datasets (SPKD_HUB_DATASETS=false); upload it as a zip or name a folder instead"
        )
        raise SpkdError("hub_datasets_disabled", msg, "dataset.torchvision")


def locate(where: Located, ds: Any) -> None:
    """None (the worker builds it) once the download is allowed and the split exists."""
    check_allowed(where.settings, ds.torchvision)
    check_torchvision_split(ds.torchvision, ds.split)
    return None


def materialise(
    where: Located, ds: Any, folder: Path | None, remote: Any, builders: Builders
) -> AbstractContextManager[Path]:
    """Its ImageFolder, built once per host."""
    home = Path(os.environ.get("TORCH_HOME") or Path.home() / ".cache" / "torch")
    return nullcontext(builders.materialise_torchvision(ds.torchvision, home, ds.split))


SOURCE = Source("torchvision", locate, materialise)
