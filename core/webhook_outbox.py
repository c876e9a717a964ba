"""The webhook outbox: job events written to a Redis stream in the same transaction as the change
they report, so a process that dies right after a job ends cannot lose its webhook.

Kept free of other app imports: core.store calls `add` from inside its status transaction, and the
sender (workers/webhooks.py) and the routes (app/routes/webhooks.py) read the same keys. Keys (P =
SPKD_REDIS_PREFIX):

    P:wh:outbox        stream: one entry per job event {type, job_id, owner, ts, data (JSON)}
    P:webhooks:<owner> zset (scores 0) of the owner's webhook ids; empty -> nothing is written
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from spkd.common.metric_names import report_acc

log = logging.getLogger("spkd.webhooks")

OUTBOX_MAXLEN = 100_000  # a bound if no sender runs for a long time; entries are deleted once fanned out
STATUS_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
STAGE_FINISHED = "job.stage_finished"
EVENT_TYPES = (*STATUS_EVENTS.values(), STAGE_FINISHED)
DEFAULT_EVENTS = tuple(STATUS_EVENTS.values())


def outbox_key(prefix: str) -> str:
    return f"{prefix}:wh:outbox"


def owner_hooks_key(prefix: str, owner: str) -> str:
    return f"{prefix}:webhooks:{owner}"


def metrics_summary(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report-split accuracies, the gain and the stage times of a job's metrics.json (no curves,
    no spec): a webhook body stays a few hundred bytes. Old jobs' `val_acc` is read as report_acc."""
    if not metrics:
        return None
    return {
        "report_acc": {role: report_acc(metrics.get(role)) for role in ("teacher", "baseline", "distilled")},
        "gain": metrics.get("gain"),
        "timing_s": metrics.get("timing"),
    }


def _json(raw: str | None) -> Any:
    return json.loads(raw) if raw else None


def add_for_transition(
    r: Any, pipe: Any, prefix: str, job_id: str, owner: str, to: str, fields: dict[str, Any]
) -> None:
    """Queue the `job.<status>` event of a final transition on `pipe` (inside its MULTI).

    `r` is a plain client for the reads: the job hash is WATCHed by the transaction, so what it
    reads here is what the job holds when the transaction commits (or the transaction retries).
    `fields` are the ones this transition writes (error, metrics...), newer than the hash. Does
    nothing for non-final statuses or when the owner has no webhook.
    """
    kind = STATUS_EVENTS.get(to)
    if kind is None or not r.exists(owner_hooks_key(prefix, owner)):
        return
    stage, error, metrics = r.hmget(f"{prefix}:job:{job_id}", "stage", "error", "metrics")
    data = {
        "id": job_id,
        "status": to,
        "stage": fields.get("stage") or stage or None,
        "error": fields["error"] if "error" in fields else _json(error),
        "metrics": metrics_summary(fields["metrics"] if "metrics" in fields else _json(metrics)),
    }
    _xadd(pipe, prefix, kind, job_id, owner, data)


# the stage_finished fields a webhook carries (the accuracy under the name of the split it is on)
_STAGE_RESULT = ("stage", "seconds", "eval_split", "selection_acc", "report_acc")


def add_stage_finished(r: Any, prefix: str, job_id: str, stage_data: dict[str, Any]) -> None:
    """Queue `job.stage_finished` (stage name, seconds, the stage's accuracy under its split's name:
    `selection_acc` for a training stage, `report_acc` for evaluate, and `eval_split`) for the
    job's owner, if the owner has a webhook. The stage event itself is already in the job's log; a
    Redis error here is logged and the notification skipped (training must not stop for it)."""
    try:
        _add_stage_finished(r, prefix, job_id, stage_data)
    except redis.RedisError as e:
        log.warning("job %s: stage_finished webhook not queued (Redis: %s)", job_id, e)


def _add_stage_finished(r: Any, prefix: str, job_id: str, stage_data: dict[str, Any]) -> None:
    owner = r.hget(f"{prefix}:job:{job_id}", "owner")
    if not owner or not r.exists(owner_hooks_key(prefix, owner)):
        return
    data: dict[str, Any] = {"id": job_id, "status": "running", "stage": stage_data.get("stage")}
    data.update(error=None, metrics=None)
    data["stage_result"] = {k: v for k, v in stage_data.items() if k in _STAGE_RESULT}
    _xadd(r, prefix, STAGE_FINISHED, job_id, owner, data)


def _xadd(r: Any, prefix: str, kind: str, job_id: str, owner: str, data: dict[str, Any]) -> None:
    entry = {
        "type": kind,
        "job_id": job_id,
        "owner": owner,
        "ts": f"{time.time():.6f}",
        "data": json.dumps(data),
    }
    r.xadd(outbox_key(prefix), entry, maxlen=OUTBOX_MAXLEN, approximate=True)
