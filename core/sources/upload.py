"""`dataset.id`: an upload of the job's owner (the API's /v1/datasets), in the uploads area or,
with object storage (SPKD_STORAGE_URL), in the bucket, fetched into the host's dataset cache
(core/bucket.py) and held there while the job trains."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from spkd.common.errors import SpkdError
from spkd.core import bucket, references, store
from spkd.core.sources.base import Builders, Located, Source


def _missing(ds_id: str) -> SpkdError:
    return SpkdError("dataset_not_found", f"no dataset {ds_id!r} for this API key", "dataset.id")


def _check_ready(record: dict[str, Any] | None, ds_id: str) -> None:
    """A large upload is usable once its background validation ended `ready` (app.validation):
    `dataset_not_ready` (API: 409, retry later) while validating, `dataset_failed` (422) after."""
    status = (record or {}).get("status", "ready")  # records older than the status field are ready
    if status == "validating":
        msg = f"dataset {ds_id!r} is still being validated: submit the job once its status is 'ready'"
        raise SpkdError("dataset_not_ready", msg, "dataset.id")
    if status == "failed":
        err = (record or {}).get("error") or {}
        msg = (
            f"dataset {ds_id!r} failed validation ({err.get('code')}: {err.get('message')}): upload it again"
        )
        raise SpkdError("dataset_failed", msg, "dataset.id")


def locate(where: Located, ds: Any) -> Path:
    """The upload's folder, only for its owner. Another key's dataset, a missing record, a missing
    folder or a folder that is not the upload's own (a symlink) all raise the same SpkdError
    `dataset_not_found`; see `_check_ready` for the others. With object storage the record is
    enough: the folder is the worker's to fetch."""
    ds_id, settings = ds.id, where.settings
    record = store.get_dataset(where.r, where.keys, ds_id, where.owner)
    _check_ready(record, ds_id)
    folder = references.uploads_dir(settings) / ds_id
    if settings.storage_url:
        if record is None:
            raise _missing(ds_id)
        return folder
    try:
        ok = record is not None and folder.is_dir() and folder.resolve() == folder
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise _missing(ds_id)
    return folder


def materialise(
    where: Located, ds: Any, folder: Path | None, remote: Any, builders: Builders
) -> AbstractContextManager[Path]:
    """The upload's folder; with object storage, its copy in the host's dataset cache, fetched once
    and held (a shared lock) while the context is open."""
    if remote is None:
        return contextlib.nullcontext(folder or locate(where, ds))
    return _fetched(remote, where, ds.id)


@contextlib.contextmanager
def _fetched(remote: Any, where: Located, ds_id: str) -> Iterator[Path]:
    try:
        local, held = bucket.fetch_dataset(remote, where.settings, ds_id)
    except FileNotFoundError:  # no complete upload in the bucket (deleted meanwhile)
        msg = f"dataset {ds_id!r} is not in the object storage"
        raise SpkdError("dataset_not_found", msg, "dataset.id") from None
    with held:  # the host's dataset cache keeps this copy while the job runs
        yield local


SOURCE = Source("id", locate, materialise)
