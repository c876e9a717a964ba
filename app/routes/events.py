"""A job's event log: a JSON page, or a live server-sent-event stream with progress."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request

from spkd.app.deps import (
    STREAM_ID,
    Ctx,
    Owner,
    check_cursor,
    own_job,
)
from spkd.app.live import EventStreamResponse, Live
from spkd.app.openapi import JOB_OPS, documented, error_responses, links
from spkd.app.schemas import (
    Event,
    EventList,
)
from spkd.core import store

log = logging.getLogger("spkd.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        **error_responses(400, 404),  # 429 too_many_streams: SPKD_MAX_STREAMS_PER_KEY
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
    "whenever step progress changes, and a final `event: end` once the job is finished. A stream the server "
    'cannot continue ends with `event: error` (`{"error": {code, message}}`) after a `retry:` hint: '
    "reconnect with `Last-Event-ID`. One API key holds at most `SPKD_MAX_STREAMS_PER_KEY` open streams "
    "per API process (past it: 429 `too_many_streams` with `Retry-After`).",
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
        live: Live = request.app.state.live
        sub = live.open(owner, job_id, last_event_id or after or "0-0")  # 429 past the key's cap
        return EventStreamResponse(live, sub)
    events = await anyio.to_thread.run_sync(lambda: store.list_events(r, keys, job_id, after, limit + 1))
    page, has_more = events[:limit], len(events) > limit
    cursor = page[-1]["id"] if page else after
    return EventList(
        data=[Event.from_store(e) for e in page], status=job["status"], has_more=has_more, next_cursor=cursor
    )
