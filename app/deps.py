"""What a route needs besides its own parameters, as typed dependencies: the caller (`Owner`), the
app's context (`Ctx`: Redis, key names, settings, the Celery client), and the id and cursor checks
every resource shares.

A route declares them in its signature (`def get_job(ctx: Ctx, owner: Owner, job_id: str)`);
FastAPI resolves them per request, and none of them adds a parameter to the OpenAPI document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import redis
import redis.asyncio as aredis
from fastapi import Depends, Request

from spkd.app.auth import request_owner
from spkd.app.errors import ApiError, not_found
from spkd.core import store
from spkd.core.settings import Settings

Owner = Annotated[str, Depends(request_owner)]


@dataclass(frozen=True)
class AppContext:
    """The per-app objects `create_app` builds once; `aredis` and `validator` exist once the
    app's lifespan has started (every request runs inside it)."""

    redis: redis.Redis
    keys: store.Keys
    settings: Settings
    celery: Any
    aredis: aredis.Redis | None
    validator: Any


def app_context(request: Request) -> AppContext:
    st = request.app.state
    return AppContext(
        st.redis, st.keys, st.settings, st.celery, getattr(st, "aredis", None), getattr(st, "validator", None)
    )


Ctx = Annotated[AppContext, Depends(app_context)]


# ---------------------------------------------------------------- ids and cursors

# 19 digits always fit the 64-bit halves of a Redis stream id (20 may not: 500 from XRANGE).
STREAM_ID = r"^[0-9]{1,19}-[0-9]{1,19}$"
JOB_ID = r"^job_[A-Za-z0-9_-]{1,64}$"
DATASET_ID = r"^ds_[A-Za-z0-9_-]{1,64}$"
# A file name, or up to 8 folder levels of them (tensorboard/<stage>/steps/events...); no segment
# starts with a dot, so `..` never is one.
_ARTIFACT_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}"
ARTIFACT_NAME = re.compile(rf"^(?:{_ARTIFACT_SEGMENT}/){{0,7}}{_ARTIFACT_SEGMENT}$")


def check_cursor(value: str | None, pattern: str, field: str, what: str) -> str | None:
    """A cursor as sent, or 400 `invalid_cursor` naming the field (never a Redis error later)."""
    if value is not None and not re.fullmatch(pattern, value):
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise ApiError(400, "invalid_cursor", f"{field} {shown!r} is not {what}", field)
    return value


def own_job(ctx: AppContext, owner: str, job_id: str) -> dict[str, Any]:
    """The caller's job record, or 404 `not_found` (another key's job answers like a missing one)."""
    # A malformed id cannot exist: the same 404 as a missing one, without asking Redis.
    job = store.get_job(ctx.redis, ctx.keys, job_id, owner) if re.fullmatch(JOB_ID, job_id) else None
    if job is None:
        raise not_found("job", job_id)
    return job
