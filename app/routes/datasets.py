"""Dataset routes: upload (a zip, scanned now or validated in the background), list, describe, delete."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response

from spkd.app import datasets
from spkd.app.deps import (
    DATASET_ID,
    Ctx,
    Owner,
    check_cursor,
)
from spkd.app.errors import ApiError, not_found
from spkd.app.openapi import documented, error_responses, links
from spkd.app.schemas import (
    Dataset,
    DatasetList,
)
from spkd.common.files import storage_full
from spkd.core import references, storage, store

log = logging.getLogger("spkd.api")

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=Dataset,
    responses={
        **error_responses(400, 413, 422, 507),
        201: links(GetDataset=("get_dataset_v1_datasets__ds_id__get", {"ds_id": "$response.body#/id"})),
        202: {"model": Dataset, "description": "large upload stored; validating in the background"},
    },
    summary="Upload a dataset (zip of an ImageFolder)",
    description="`multipart/form-data` with the zip in a `file` part (and an optional `name` field), or "
    "the zip as the raw body (`Content-Type: application/zip`, name in `?name=`). Layouts: `class/x.jpg`, "
    "or `train/class/x.jpg` with `val/` and/or `test/` beside it, inside any wrapping folder "
    "(docs/datasets.md). The zip is scanned by the engine's own scanner: files left out are listed "
    "with a reason. "
    "A zip larger than SPKD_UPLOAD_SYNC_MAX_BYTES answers 202 with `status: validating` and a Location; "
    "poll it until `ready` or `failed` (`error: {code, message}`).",
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string"},
                        },
                        "required": ["file"],
                    }
                },
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    },
)
async def upload_dataset(
    request: Request,
    ctx: Ctx,
    response: Response,
    owner: Owner,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Dataset:
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    root = references.datasets_dir(settings)
    ds_id = store.new_id("ds")
    try:
        with tempfile.TemporaryDirectory(prefix=".upload-", dir=root) as tmp:
            zip_path = Path(tmp) / "upload.zip"
            fields = await datasets.receive_upload(
                request.stream(),
                request.headers.get("content-type", ""),
                request.headers.get("content-length"),
                zip_path,
                settings.max_upload_bytes,
            )
            label = (fields.get("name") or name or ds_id)[:200]
            if zip_path.stat().st_size > settings.upload_sync_max_bytes:  # scanned in the background
                accept = ctx.validator.accept
                record = await anyio.to_thread.run_sync(accept, zip_path, ds_id, owner, label)
                response.status_code, response.headers["Location"] = 202, f"/v1/datasets/{ds_id}"
                return Dataset.from_store(record)
            res = await anyio.to_thread.run_sync(datasets.extract_dataset, zip_path, root / ds_id, settings)
    except OSError as e:
        if storage_full(e) is None:
            raise
        raise _storage_full("the dataset storage (SPKD_DATA_ROOT)") from e
    record = datasets.dataset_record(ds_id, owner, label, res, settings)
    try:
        await anyio.to_thread.run_sync(store.save_dataset, r, keys, record)
    except BaseException:
        # No record, no folder: an extracted dataset the API cannot see would only fill the disk.
        await anyio.to_thread.run_sync(storage.remove_tree, root / ds_id)
        raise
    return Dataset.from_store(record)


def _storage_full(where: str) -> ApiError:
    return ApiError(
        507,
        "storage_full",
        f"{where} is full; nothing was kept. Free space on the server (or delete old datasets "
        "and jobs), then retry",
        "file",
    )


@router.get(
    "",
    response_model=DatasetList,
    summary="List datasets, newest first",
    responses={
        **error_responses(400, 422),
        200: links(
            NextPage=("list_datasets_v1_datasets_get", {"after": "$response.body#/next_cursor"}),
            GetDataset=("get_dataset_v1_datasets__ds_id__get", {"ds_id": "$response.body#/data/0/id"}),
        ),
    },
)
def list_datasets(
    ctx: Ctx,
    owner: Owner,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    after: Annotated[str | None, Query(**documented(DATASET_ID, "next_cursor of the previous page"))] = None,
) -> DatasetList:
    r, keys = ctx.redis, ctx.keys
    after = check_cursor(after, DATASET_ID, "after", "a dataset id (the next_cursor of a previous page)")
    items, cursor = store.list_datasets(r, keys, owner, limit, after)
    return DatasetList(
        data=[Dataset.from_store(d) for d in items], has_more=cursor is not None, next_cursor=cursor
    )


@router.get("/{ds_id}", response_model=Dataset, responses=error_responses(404), summary="Describe a dataset")
def get_dataset(ctx: Ctx, owner: Owner, ds_id: str) -> Dataset:
    r, keys = ctx.redis, ctx.keys
    ds = store.get_dataset(r, keys, ds_id, owner) if re.fullmatch(DATASET_ID, ds_id) else None
    if ds is None:
        raise not_found("dataset", ds_id)
    return Dataset.from_store(ds)


@router.delete(
    "/{ds_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404, 409),
    summary="Delete a dataset",
    description="Removes the dataset's record and files. Refused (409 `dataset_in_use`, with the job "
    "ids) while a queued, running or paused job uses it: cancel those first. Finished jobs keep their "
    "results.",
)
def delete_dataset(ctx: Ctx, owner: Owner, ds_id: str) -> Response:
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    try:
        ds = storage.delete_dataset(r, keys, settings, ds_id, owner)
    except store.Conflict as e:
        users = store.jobs_using_dataset(r, keys, owner, ds_id)
        raise ApiError(409, "dataset_in_use", str(e), jobs=users) from e
    if ds is None:
        raise not_found("dataset", ds_id)
    return Response(status_code=204)
