"""Helpers for the OpenAPI document the routes declare: error responses, documented patterns, and
links (how one response's ids and cursors feed the next request, for clients and for schemathesis'
stateful phase)."""

from __future__ import annotations

from typing import Any

from spkd.app.schemas import ErrorResponse


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error bodies a route can answer: always 401, 429 and 503, plus `codes`."""
    return {c: {"model": ErrorResponse} for c in (401, 429, 503, *codes)}


def documented(pattern: str, description: str) -> dict[str, Any]:
    """A query/header parameter's pattern in the document; checked by `app.deps.check_cursor`
    (a 400 `invalid_cursor`, not FastAPI's 422)."""
    return {"json_schema_extra": {"pattern": pattern}, "description": description}


def links(**named: tuple[str, dict[str, str]]) -> dict[str, Any]:
    """OpenAPI links, name -> (operationId, parameters)."""
    return {
        "links": {name: {"operationId": op, "parameters": params} for name, (op, params) in named.items()}
    }


JOB_OPS = {
    "GetJob": "get_job_v1_jobs__job_id__get",
    "JobEvents": "job_events_v1_jobs__job_id__events_get",
    "JobArtifacts": "list_artifacts_v1_jobs__job_id__artifacts_get",
    "CancelJob": "cancel_job_v1_jobs__job_id__cancel_post",
}


def job_links(id_expr: str) -> dict[str, Any]:
    """Links from a response that names a job (at `id_expr`) to that job's operations."""
    return links(**{name: (op, {"job_id": id_expr}) for name, op in JOB_OPS.items()})
