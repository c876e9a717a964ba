"""The SSE messages of the live event streams (app/live.py): each formatted once, as a `Frame`, for
every subscriber of its job: events, progress, `end`, and the `error` that ends a stream with a
`retry:` hint (shaped like every API error)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from spkd.app.errors import error_body
from spkd.app.schemas import Event, ProgressOut
from spkd.core import jsonsafe, store

log = logging.getLogger("spkd.api")

RETRY_MS = 2000  # the reconnect delay every stream announces, and repeats with an error


@dataclass(frozen=True)
class Frame:
    """One SSE message, formatted once for every subscriber. `event_id`: a log entry (skipped by a
    stream whose cursor is already past it); `progress`: the raw progress it shows (skipped when
    unchanged); `last`: the stream ends after it (`end`, `error`)."""

    text: str
    event_id: str | None = None
    progress: str | None = None
    last: bool = False


def sse(event: str, data: Any, event_id: str | None = None, retry_ms: int | None = None) -> str:
    """One SSE message: `event:` + one `data:` line of JSON (+ `id:`, `retry:` when given)."""
    head = f"id: {event_id}\n" if event_id else ""
    if retry_ms is not None:
        head += f"retry: {retry_ms}\n"
    return f"{head}event: {event}\ndata: {jsonsafe.dumps(data, default=str)}\n\n"


def error_frame(code: str, message: str) -> Frame:
    """The last message of a stream that failed: `retry:` (when to reconnect) and an `error` event
    shaped like every API error ({"error": {code, message, field}})."""
    return Frame(sse("error", error_body(code, message), retry_ms=RETRY_MS), last=True)


def event_frame(entry_id: str, fields: dict[str, str]) -> Frame | None:
    """A log entry as an SSE message; None (logged) for one that does not decode, which is
    skipped instead of failing every stream of its job."""
    try:
        e = Event.from_store(store._event(entry_id, fields))  # the store's own entry decoding
    except (ValueError, TypeError) as exc:
        log.warning("event %s does not decode (%s); not streamed", entry_id, exc)
        return None
    return Frame(sse(e.kind, e.model_dump(mode="json"), e.id), event_id=e.id)


def progress_frame(raw: str) -> Frame | None:
    """A job's progress field as an SSE `progress` message; None (logged) when it does not decode."""
    try:
        body = ProgressOut.model_validate(json.loads(raw)).model_dump(mode="json")
    except (ValueError, TypeError) as exc:
        log.warning("job progress does not decode (%s); not streamed", exc)
        return None
    return Frame(sse("progress", body), progress=raw)


def end_frame(status: str) -> Frame:
    """The last message of a stream whose job is final: `end` with its status."""
    return Frame(sse("end", {"status": status}), last=True)


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as a tuple that sorts in stream order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def store_down_frame(exc: BaseException) -> Frame:
    """The `error` that ends a stream when Redis did not answer (`exc`)."""
    return error_frame(
        "store_unavailable",
        f"the job store (Redis) did not answer ({type(exc).__name__}); reconnect with Last-Event-ID",
    )
