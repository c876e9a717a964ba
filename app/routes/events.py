"""A job's event log: a JSON page, or a live server-sent-event stream with progress."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.deps import (
    STREAM_ID,
    AppContext,
    Ctx,
    Owner,
    check_cursor,
    own_job,
)
from app.openapi import JOB_OPS, documented, error_responses, links
from app.schemas import (
    Event,
    EventList,
    ProgressOut,
)
from core import jsonsafe, store

log = logging.getLogger("spkd.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        **error_responses(400, 404),
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON or SSE",
            **links(
                NextEvents=(
                    JOB_OPS["JobEvents"],
                    {"job_id": "$request.path.job_id", "after": "$response.body#/next_cursor"},
                )
            ),
        },
    },
    summary="Event log (JSON, or a server-sent-event stream)",
    description="JSON by default. With `Accept: text/event-stream` (or `?stream=true`) a live SSE stream: "
    "one `event: <kind>` per log entry with `id:` (resume with `Last-Event-ID`), `event: progress` "
    "whenever step progress changes, and a final `event: end` once the job is finished.",
)
async def job_events(
    request: Request,
    ctx: Ctx,
    owner: Owner,
    job_id: str,
    after: Annotated[str | None, Query(**documented(STREAM_ID, "id of the last event seen"))] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    stream: bool = False,
    last_event_id: Annotated[
        str | None, Header(**documented(STREAM_ID, "SSE resume: id of the last event seen"))
    ] = None,
) -> Any:
    r, keys = ctx.redis, ctx.keys
    after = check_cursor(after, STREAM_ID, "after", "an event id (<ms>-<seq>, as in the event log)")
    last_event_id = check_cursor(last_event_id, STREAM_ID, "Last-Event-ID", "an event id (<ms>-<seq>)")
    job = await anyio.to_thread.run_sync(own_job, ctx, owner, job_id)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        start = last_event_id or after or "0-0"
        return StreamingResponse(
            _sse(ctx, job_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events = await anyio.to_thread.run_sync(lambda: store.list_events(r, keys, job_id, after, limit + 1))
    page, has_more = events[:limit], len(events) > limit
    cursor = page[-1]["id"] if page else after
    return EventList(
        data=[Event.from_store(e) for e in page], status=job["status"], has_more=has_more, next_cursor=cursor
    )


def _sse_frame(event: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {jsonsafe.dumps(data, default=str)}\n\n"


async def _sse(ctx: AppContext, job_id: str, last: str) -> AsyncIterator[str]:
    ar, keys = ctx.aredis, ctx.keys
    assert ar is not None  # set by the app's lifespan, inside which every request runs
    last_progress: str | None = None
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        status, progress = await store.aget_job_fields(ar, keys, job_id, "status", "progress")
        # Status first, events second: a final status is written together with its event,
        # so reading events after seeing it never misses the last one.
        events = await store.aread_events(
            ar, keys, job_id, last, block_ms=0 if status in store.FINAL else 1000
        )
        for e in events:
            yield _sse_frame(e["kind"], Event.from_store(e).model_dump(mode="json"), e["id"])
            last = e["id"]
        if progress and progress != last_progress:
            last_progress = progress
            body = ProgressOut.model_validate(json.loads(progress)).model_dump(mode="json")
            yield _sse_frame("progress", body)
        if status in store.FINAL and not events:
            yield _sse_frame("end", {"status": status})
            return
        if events or progress:
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > 15:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
