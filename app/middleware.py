"""Request guards that run before any route parses anything. Pure ASGI (no BaseHTTPMiddleware),
so streamed bodies and responses pass through untouched.

- `BodyLimitMiddleware`: a request body larger than its route's limit is answered 413 with the
  JSON error shape (app/errors.py) before the route reads it: at once by its Content-Length, or,
  for a chunked body, as soon as the bytes counted so far pass the limit (the route is then told
  the body failed, so an upload in progress deletes what it wrote). Dataset uploads
  (POST /v1/datasets) are limited by SPKD_MAX_UPLOAD_BYTES, predict requests (POST
  /v1/jobs/{id}/predict) by SPKD_PREDICT_MAX_IMAGES x SPKD_PREDICT_MAX_IMAGE_BYTES, every other
  request by SPKD_MAX_BODY_BYTES.
- `TextMiddleware`: query parameters and free-text headers (Idempotency-Key) with control or
  bidirectional-control characters (common.spec.text_problem) are answered 422 naming the
  parameter, the same rule the JSON fields follow.

Both read the settings from `app.state.settings` at each request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException

from spkd.app.errors import clip, error_body
from spkd.common.spec import text_problem
from spkd.core.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_ROUTE = ("POST", "/v1/datasets")
PREDICT_ROUTE = re.compile(r"/v1/jobs/[^/]+/predict/?")  # app/routes/predict.py: images
MULTIPART_ALLOWANCE = 1024**2  # part headers and boundaries around a predict request's images
# Headers whose value is stored and shown back as text (others are parsed or compared).
TEXT_HEADERS = (b"idempotency-key",)


async def send_error(send: Send, status: int, body: dict[str, Any], close: bool = False) -> None:
    """Answer with the JSON error shape; `close` asks the server to drop the connection (a body
    left unread cannot be skipped on a kept-alive connection)."""
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class BodyTooLarge(HTTPException):
    """Raised into the route when a streamed body passes its limit (FastAPI passes HTTPExceptions
    raised while it reads a body through untouched). The client has its 413 already."""


def body_limit(settings: Settings, method: str, path: str) -> tuple[int, str, str]:
    """(limit in bytes, error code, message) for a request body of `method path`."""
    if (method, path.rstrip("/")) == UPLOAD_ROUTE:
        cap = settings.max_upload_bytes
        return cap, "upload_too_large", f"upload is larger than the {cap} byte limit (SPKD_MAX_UPLOAD_BYTES)"
    if method == "POST" and PREDICT_ROUTE.fullmatch(path):
        cap = settings.predict_max_images * settings.predict_max_image_bytes + MULTIPART_ALLOWANCE
        why = (
            f"the request body is larger than {cap} bytes: at most SPKD_PREDICT_MAX_IMAGES "
            f"({settings.predict_max_images}) images of SPKD_PREDICT_MAX_IMAGE_BYTES "
            f"({settings.predict_max_image_bytes}) each"
        )
        return cap, "payload_too_large", why
    cap = settings.max_body_bytes
    why = f"the request body is larger than the {cap} byte limit (SPKD_MAX_BODY_BYTES)"
    return cap, "payload_too_large", why


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, code, message = body_limit(self.state.settings, scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await send_error(send, 413, error_body(code, message), close=True)
            return
        received, refused, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await send_error(send, 413, error_body(code, message), close=True)
                    raise BodyTooLarge(413, message)
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if refused:  # the 413 is out: whatever the route answers to its error is dropped
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not refused:
                raise


class TextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _text_problem(scope)
            if problem is not None:
                field, why = problem
                body = error_body("invalid_request", f"{field}: {why}", field)
                body["error"]["details"] = [{"field": field, "message": why}]
                await send_error(send, 422, body)
                return
        await self.app(scope, receive, send)


def _text_problem(scope: Scope) -> tuple[str, str] | None:
    """(parameter, problem) of the first query parameter or text header that text_problem refuses."""
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        for part, what in ((value, name), (name, "query parameter name")):
            why = text_problem(part)
            if why:
                return clip(what), why
    for name, value in scope["headers"]:
        if name in TEXT_HEADERS:
            # Bytes on the wire: read as UTF-8 when they are (a bidi control is then named as
            # itself), else as Latin-1 like Starlette (bytes 0x80-0x9f are C1 controls).
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text = value.decode("latin-1")
            why = text_problem(text)
            if why:
                return name.decode(), why
    return None
