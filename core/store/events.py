"""A job's event log: the stream P:events:<id> (XADD, capped at EVENTS_MAXLEN), read by pages
(XRANGE) and by the API's live streams (XREAD BLOCK). A runner's entries name the attempt (its
fencing token) that wrote them."""

from __future__ import annotations

import json
from typing import Any

import redis

from spkd.core import jsonsafe
from spkd.core.store.keys import EVENTS_MAXLEN, Keys, _flat, now
from spkd.core.store.leases import _if_job_exists, fenced


def _entry(kind: str, message: str, data: dict[str, Any], fence: int | None = None) -> dict[str, str]:
    """A stream entry; a runner's entries also name the attempt (fencing token) that wrote them."""
    data_json = jsonsafe.dumps(data, default=str)
    entry = {"kind": kind, "message": message, "ts": f"{now():.3f}", "data": data_json}
    if fence is not None:
        entry["attempt"] = str(fence)
    return entry


def _xadd(
    r: Any, keys: Keys, job_id: str, kind: str, message: str, data: dict[str, Any], fence: int | None = None
) -> Any:
    entry = _entry(kind, message, data, fence)
    return r.xadd(keys.events(job_id), entry, maxlen=EVENTS_MAXLEN, approximate=True)


def add_event(
    r: redis.Redis, keys: Keys, job_id: str, kind: str, message: str, fence: int | None = None, **data: Any
) -> str | None:
    """Append an event; with `fence` (a runner's event) only while that token is current, else
    Fenced. Without: nothing is written (None) when the job does not exist, so a deleted job's log
    is never recreated."""
    entry = _entry(kind, message, data, fence)
    if fence is None:
        command = ["XADD", keys.events(job_id), "MAXLEN", "~", EVENTS_MAXLEN, "*", *_flat(entry)]
        return _if_job_exists(r, keys, job_id, command)
    xadd = ("xadd", keys.events(job_id), "MAXLEN", "~", EVENTS_MAXLEN, "*", *_flat(entry))
    return fenced(r, keys, job_id, fence, [xadd])[0]


def _event(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    event = {
        "id": entry_id,
        "ts": float(fields.get("ts", 0)),
        "kind": fields.get("kind", ""),
        "message": fields.get("message", ""),
        "data": json.loads(fields.get("data") or "{}"),
    }
    if fields.get("attempt"):
        event["attempt"] = int(fields["attempt"])  # the runner attempt that wrote it
    return event


def list_events(
    r: redis.Redis, keys: Keys, job_id: str, after: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Up to `limit` of the job's events after the entry id `after` (from the start without it)."""
    lo = f"({after}" if after else "-"
    return [_event(i, f) for i, f in r.xrange(keys.events(job_id), lo, "+", count=limit)]


async def aread_events(ar: Any, keys: Keys, job_id: str, after: str, block_ms: int) -> list[dict[str, Any]]:
    """Async XREAD BLOCK for the SSE stream (`ar` is a redis.asyncio client)."""
    # BLOCK 0 means "forever" to Redis: a non-blocking read must send no BLOCK at all.
    res = await ar.xread({keys.events(job_id): after or "0-0"}, count=500, block=block_ms or None)
    return [_event(i, f) for _, entries in (res or []) for i, f in entries]


async def aget_job_fields(ar: Any, keys: Keys, job_id: str, *names: str) -> list[str | None]:
    """Async HMGET of the job hash's `names` (None for each absent field)."""
    return await ar.hmget(keys.job(job_id), *names)
