"""Artifact downloads: from the artifact root (shared folders), or from the bucket (SPKD_STORAGE_URL):
a 307 redirect to a presigned URL valid SPKD_S3_PRESIGN_TTL_S seconds, or, with
SPKD_S3_DOWNLOAD=stream, the object streamed through the API. Either way the response carries the
registered sha256 (ETag, X-Checksum-Sha256)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from starlette.responses import Response

from spkd.app.errors import not_found
from spkd.core import attempts, blobs, bucket
from spkd.core.settings import Settings


def artifact_response(settings: Settings, job: dict[str, Any], name: str, meta: dict[str, Any]) -> Response:
    """The response for a registered artifact `name` ({name, size, sha256} in `meta`) of the job
    record `job`, read from the attempt folder (or prefix) the record names (core/attempts.py).
    Raises ApiError 404 when its file (or object) is gone, StorageUnavailable (-> 503)."""
    job_id, output = job["id"], job.get("output")
    headers = {"ETag": f'"{meta["sha256"]}"', "X-Checksum-Sha256": meta["sha256"]}
    filename = Path(name).name
    remote = blobs.remote(settings)
    if remote is None:
        path = _local(settings, job_id, output) / name
        if not path.is_file():
            raise not_found("artifact", name)
        return FileResponse(path, filename=filename, media_type="application/octet-stream", headers=headers)
    key = bucket.artifact_key(job_id, name, output)
    if settings.s3_download == "redirect":
        url = remote.presign(key, settings.s3_presign_ttl_s, filename)
        return RedirectResponse(url, status_code=307, headers={**headers, "Cache-Control": "no-store"})
    if not remote.exists(key):
        raise not_found("artifact", name)
    headers |= {
        "Content-Length": str(meta["size"]),
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    return StreamingResponse(remote.iter_bytes(key), media_type="application/octet-stream", headers=headers)


def member_file(settings: Settings, job: dict[str, Any], name: str, tmp_dir: Path) -> Path:
    """A registered artifact of the job record `job` as a local file (for the zip of a model
    folder): the artifact root's, or fetched from the bucket into `tmp_dir`."""
    remote = blobs.remote(settings)
    if remote is None:
        return _local(settings, job["id"], job.get("output")) / name
    dest = tmp_dir / name
    remote.get_file(bucket.artifact_key(job["id"], name, job.get("output")), dest)
    return dest


def _local(settings: Settings, job_id: str, output: str | None) -> Path:
    return attempts.output_dir(Path(settings.artifact_root).resolve() / job_id, output)
