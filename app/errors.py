"""One error shape for every response: {"error": {"code", "message", "field"}} with stable codes.

Handlers here turn FastAPI's own 404/405/422, Starlette HTTP errors and Redis outages into that
shape, so clients (and `spkd`) never have to parse more than one format.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spkd.common.files import storage_full
from spkd.core import blobs

log = logging.getLogger("spkd.api")

# HTTP status -> default stable code, for errors raised by the framework itself.
DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    507: "storage_full",
}


class ApiError(Exception):
    """Raise anywhere in a route: becomes the JSON error body with this status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}
        self.extra = extra


ECHO_MAX = 100  # characters of a user's value an error message repeats
MESSAGE_MAX = 2000  # characters of any error message (what it echoes included)
MAX_DETAILS = 50  # validation errors listed in one 422
_LONG = ECHO_MAX + 1
_QUOTED = re.compile(f"'[^'\\n]{{{_LONG},}}'|\"[^\"\\n]{{{_LONG},}}\"")


def clip(text: str, limit: int = ECHO_MAX) -> str:
    """`text` cut to at most `limit` characters, an ellipsis (…) ending a cut one."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def bound(message: str) -> str:
    """An error message with every quoted value in it (the `{value!r}` of a validator) clipped to
    ECHO_MAX characters, and the whole to MESSAGE_MAX: a 1 MB value is never sent back whole."""
    if len(message) > 2 * ECHO_MAX:
        message = _QUOTED.sub(lambda m: m.group()[0] + clip(m.group()[1:-1]) + m.group()[0], message)
    return clip(message, MESSAGE_MAX)


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    """The one error shape, {"error": {code, message, field, ...}}; message and field bounded."""
    field = None if field is None else clip(field, 2 * ECHO_MAX)
    return {"error": {"code": code, "message": bound(message), "field": field, **extra}}


def not_found(what: str, ident: str) -> ApiError:
    # Same answer for "does not exist" and "belongs to another key": no existence oracle.
    return ApiError(404, f"{what}_not_found", f"no {what} {clip(ident)!r} for this API key")


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [clip(str(p)) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


# pydantic's wording for the exceptions our validators raise; the message after it is ours
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def _detail(error: dict[str, Any]) -> dict[str, Any]:
    """One validation error as {field, message} a person reads: a body that is not JSON at all
    names no field (pydantic's loc is the byte offset), and pydantic's prefixes are dropped."""
    if error.get("type") == "json_invalid":
        loc, why = error.get("loc") or (), (error.get("ctx") or {}).get("error", "")
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return {"field": None, "message": f"the request body is not valid JSON ({why}{where})"}
    message = str(error.get("msg", ""))
    for prefix in _PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix)
    value = error.get("input")
    if isinstance(value, str) and len(value) > ECHO_MAX:  # echoed as is, or as its repr
        message = message.replace(repr(value), repr(clip(value))).replace(value, clip(value))
    return {"field": _loc_to_field(error.get("loc", ())), "message": bound(message)}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = error_body(exc.code, exc.message, exc.field, **exc.extra)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [_detail(e) for e in exc.errors()[:MAX_DETAILS]]
        first = details[0] if details else {"field": None, "message": "invalid request"}
        lines = [f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details[:5]]
        message = "; ".join(lines)
        body = error_body("invalid_request", message or first["message"], first["field"] or None)
        body["error"]["details"] = details
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = DEFAULT_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(
            error_body(code, message), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job store unavailable: %s", exc)
        body = error_body("store_unavailable", "the job store (Redis) is unreachable; retry shortly")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(blobs.StorageUnavailable)
    async def _bucket_down(_: Request, exc: blobs.StorageUnavailable) -> JSONResponse:
        log.warning("object storage unavailable: %s", exc.message)  # never holds credentials
        body = error_body(exc.code, exc.message)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        if storage_full(exc) is not None:  # a disk full is the operator's to fix, not a bug: say so
            log.warning("storage full: %s", exc)
            body = error_body("storage_full", "the server's storage is full; free space, then retry")
            return JSONResponse(body, status_code=507)
        log.exception("unhandled error")
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)
