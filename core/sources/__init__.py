"""Dataset sources: where a job's images come from, one module per kind, registered in `SOURCES`.

A kind is named by one `dataset` field (`path`, `id`, `hf`, `torchvision`) and resolved in two
steps, both here: `locate` (the API at submission, the worker again at run time: files can change
in between) checks everything that can be known without reading an image and returns the folder,
or None for a dataset the worker builds; `materialise` (the worker, once per job) turns that into
the ImageFolder the engine scans, held for as long as the job trains. A new source is a new module
with a `SOURCE` and one line in `SOURCES`; what must be built with the engine (an ImageFolder from
a download) comes in through `Builders`, which the worker hands in (core never imports models).
Torch-free. Every refusal is a `common.errors.SpkdError(code, message, field)`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from spkd.core.source_checks import check_source_fields
from spkd.core.sources import hf, path, torchvision, upload
from spkd.core.sources.base import Builders, Located, Source

__all__ = ["SOURCES", "Builders", "Located", "Source", "locate", "materialise", "of"]

SOURCES: dict[str, Source] = {s.field: s for s in (path.SOURCE, upload.SOURCE, hf.SOURCE, torchvision.SOURCE)}


def of(ds: Any) -> Source:
    """The source a spec's `dataset` names (the spec allows exactly one of its fields)."""
    return next(s for field, s in SOURCES.items() if getattr(ds, field) is not None)


def locate(where: Located, ds: Any) -> Path | None:
    """Check the spec's dataset source for `where.owner` (fields that apply to it, the areas it may
    reach, its layout); returns its folder, or None when the worker builds it. Raises SpkdError."""
    check_source_fields(ds)
    return of(ds).locate(where, ds)


def materialise(
    where: Located, ds: Any, folder: Path | None, remote: Any, builders: Builders
) -> AbstractContextManager[Path]:
    """The folder the job trains on, from what `locate` returned: built or fetched once per host
    (`remote`: the object storage, core.blobs, or None), held while the context is open. Raises
    SpkdError."""
    return of(ds).materialise(where, ds, folder, remote, builders)
