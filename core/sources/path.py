"""`dataset.path`: a folder under the server's data root, outside its uploads area
(core/references.py `resolve_dataset_path` holds the area rules)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from spkd.core import references
from spkd.core.source_checks import check_image_folder
from spkd.core.sources.base import Builders, Located, Source


def locate(where: Located, ds: Any) -> Path:
    """The resolved folder; SpkdError `dataset_path_not_allowed`, `dataset_not_found`, or a folder
    that cannot hold classes (core/source_checks.py)."""
    folder = references.resolve_dataset_path(where.settings, ds.path or "")
    check_image_folder(folder, ds.path or "")
    return folder


def materialise(
    where: Located, ds: Any, folder: Path | None, remote: Any, builders: Builders
) -> AbstractContextManager[Path]:
    """The folder itself: it is on this host already."""
    return nullcontext(folder or locate(where, ds))


SOURCE = Source("path", locate, materialise)
