"""A job's artifacts: the list, one file (streamed, with its sha256), or a model folder as a zip."""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from spkd.app import downloads
from spkd.app.deps import (
    ARTIFACT_NAME,
    Ctx,
    Owner,
    own_job,
)
from spkd.app.errors import ApiError, not_found
from spkd.app.openapi import error_responses, links
from spkd.app.schemas import (
    ArtifactList,
)
from spkd.core import store
from spkd.core.settings import Settings

log = logging.getLogger("spkd.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactList,
    responses={
        **error_responses(404),
        200: links(
            Download=(
                "download_artifact_v1_jobs__job_id__artifacts__name__get",
                {"job_id": "$request.path.job_id", "name": "$response.body#/data/0/name"},
            )
        ),
    },
    summary="List artifacts",
)
def list_artifacts(ctx: Ctx, owner: Owner, job_id: str) -> ArtifactList:
    r, keys = ctx.redis, ctx.keys
    own_job(ctx, owner, job_id)
    return ArtifactList(data=store.list_artifacts(r, keys, job_id))


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        **error_responses(404, 503),
        200: {"content": {"application/octet-stream": {}}},
        307: {"description": "with SPKD_STORAGE_URL: a presigned URL of the object"},
    },
    summary="Download an artifact (streamed, or redirected to object storage)",
)
def download_artifact(
    ctx: Ctx,
    owner: Owner,
    job_id: str,
    name: str,
    format: Annotated[
        Literal["zip"] | None,
        Query(description="zip: a model folder (student, teacher, baseline, distilled) as one archive"),
    ] = None,
) -> Response:
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    job = own_job(ctx, owner, job_id)
    if format == "zip":
        return _folder_zip(r, keys, settings, job, name)
    # Only registered names: no path tricks; a malformed name is not one (404 without Redis).
    meta = store.get_artifact(r, keys, job_id, name) if ARTIFACT_NAME.fullmatch(name) else None
    if meta is None:
        raise _folder_hint(r, keys, job_id, name) or not_found("artifact", name)
    return downloads.artifact_response(settings, job, name, meta)


def _folder_hint(r: redis.Redis, keys: store.Keys, job_id: str, name: str) -> ApiError | None:
    """A 404 that says how to download `name` when it is a model folder, not a file (the caller
    owns the job, so naming its files reveals nothing)."""
    prefix = name.rstrip("/") + "/"
    files = sorted(a["name"] for a in store.list_artifacts(r, keys, job_id) if a["name"].startswith(prefix))
    if not files:
        return None
    return ApiError(
        404,
        "artifact_not_found",
        f"{name!r} is a folder of {len(files)} files, not a file: download it as one zip with "
        f"?format=zip, or one file by its name ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})",
    )


def _folder_zip(
    r: redis.Redis, keys: store.Keys, settings: Settings, job: dict[str, Any], name: str
) -> FileResponse:
    """The registered artifacts under `name/` as one zip (`name/...` inside), built in a temporary
    file that is removed once sent. 404 when no registered artifact is under that folder."""
    prefix = name.rstrip("/") + "/"
    members = [a["name"] for a in store.list_artifacts(r, keys, job["id"]) if a["name"].startswith(prefix)]
    if not ARTIFACT_NAME.fullmatch(name.rstrip("/")) or not members:
        raise not_found("artifact", name)
    tmp = tempfile.NamedTemporaryFile(prefix=".spkd-zip-", suffix=".zip", delete=False)  # noqa: SIM115
    with (
        tmp,
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf,  # weights do not compress
        tempfile.TemporaryDirectory(prefix=".spkd-zip-") as fetched,
    ):
        for member in members:
            zf.write(downloads.member_file(settings, job, member, Path(fetched)), member)
    return FileResponse(
        tmp.name,
        filename=f"{Path(prefix).name}.zip",
        media_type="application/zip",
        background=BackgroundTask(os.unlink, tmp.name),
    )
