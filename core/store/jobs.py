"""Jobs: create, read, list, update, move between statuses (every index and the webhook outbox in
the same transaction), cancel, pause, resume, delete; the cancel/pause flags a worker polls.

A job is the hash P:job:<id> (encoded by keys._encode); its ids are also in P:jobs:<owner>,
P:jobs:<owner>:<status> and P:status:<status>, which every status change keeps in step."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import redis

from spkd.common.reporter import Fenced
from spkd.core import webhook_outbox
from spkd.core.store.artifacts import _write_artifacts
from spkd.core.store.events import _xadd
from spkd.core.store.idempotency import _idem_names
from spkd.core.store.keys import (
    ACTIVE,
    AT_REST,
    CANCELLED,
    FAILED,
    FINAL,
    PAUSED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    VALIDATING,
    CancelPending,
    Conflict,
    InUse,
    Keys,
    NotPausable,
    _decode,
    _encode,
    _flat,
    new_id,
    now,
)
from spkd.core.store.leases import _if_job_exists, fenced


def create_job(
    r: redis.Redis, keys: Keys, owner: str, spec: dict[str, Any], job_id: str | None = None
) -> dict[str, Any]:
    """Store a new `queued` job (indexes and its first event in one transaction); returns it."""
    job_id = job_id or new_id("job")
    t = now()
    fields = {
        "id": job_id,
        "owner": owner,
        "status": QUEUED,
        "spec": spec,
        "created_at": t,
        "updated_at": t,
        "attempts": 0,
        "cancel_requested": 0,
        "pause_requested": 0,
    }
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.job(job_id), mapping=_encode(fields))
    pipe.zadd(keys.jobs(owner), {job_id: 0})
    pipe.zadd(keys.jobs(owner, QUEUED), {job_id: 0})
    pipe.zadd(keys.status(QUEUED), {job_id: t})
    _xadd(pipe, keys, job_id, "status", "job queued", {"status": QUEUED})
    pipe.execute()
    return get_job(r, keys, job_id)  # type: ignore[return-value]


def get_job(r: redis.Redis, keys: Keys, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
    """The job, or None when it does not exist or (with `owner`) belongs to someone else."""
    raw = r.hgetall(keys.job(job_id))
    if not raw or (owner is not None and raw.get("owner") != owner):
        return None
    return _decode(raw)


def update_job(r: redis.Redis, keys: Keys, job_id: str, fence: int | None = None, **fields: Any) -> None:
    """Fields that do not change the status (progress, stage, metrics, warnings...).

    With `fence` (a runner's write): only while that token is the job's current one, else Fenced.
    Without: a no-op when the job does not exist (deleted)."""
    fields["updated_at"] = now()
    mapping = _encode(fields)
    if fence is None:
        _if_job_exists(r, keys, job_id, ["HSET", keys.job(job_id), *_flat(mapping)])
        return
    fenced(r, keys, job_id, fence, [("hset", keys.job(job_id), *_flat(mapping))])


def start_attempt(r: redis.Redis, keys: Keys, job_id: str) -> int | None:
    """Count one more run of the job; its number, or None when the job no longer exists."""
    return _if_job_exists(r, keys, job_id, ["HINCRBY", keys.job(job_id), "attempts", 1])


def bump_attempts(r: redis.Redis, keys: Keys, job_id: str, fence: int) -> int:
    """Count one more attempt at the job (fenced); returns the new count."""
    return int(fenced(r, keys, job_id, fence, [("hincrby", keys.job(job_id), "attempts", 1)])[0])


def transition(
    r: redis.Redis,
    keys: Keys,
    job_id: str,
    to: str,
    allowed_from: Iterable[str],
    message: str | None = None,
    event_data: dict[str, Any] | None = None,
    fence: int | None = None,
    artifacts: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Atomically move a job between statuses (WATCH/MULTI), updating every index; `artifacts`
    (when given) are registered in the same transaction.

    With `fence` (a runner's write) the move happens only while that token is the job's current
    one (the token is read under the same WATCH, so a takeover in between aborts and retries):
    Fenced otherwise. Raises Conflict when the job is not in one of `allowed_from` (e.g. cancelled meanwhile),
    CancelPending for `paused` or a final status other than `cancelled` once a cancel was accepted,
    KeyError when it does not exist. Moving to `paused` or a final status clears the pause flag;
    `paused` also records `paused_at` (retention counts a paused job's age from then).
    """
    allowed = set(allowed_from)
    jkey = keys.job(job_id)

    def _tx(pipe: redis.client.Pipeline) -> str:
        current, owner, cancel, token = pipe.hmget(jkey, "status", "owner", "cancel_requested", "fence")
        if fence is not None and token != str(fence):
            raise Fenced(f"job {job_id}: attempt {fence} is no longer current ({token or 'no job'})")
        if current is None:
            raise KeyError(job_id)
        if current not in allowed:
            raise Conflict(f"job {job_id} is {current}, not one of {sorted(allowed)}")
        if (to in FINAL or to == PAUSED) and to != CANCELLED and cancel == "1":
            raise CancelPending(f"job {job_id} has a cancel request; it can only end cancelled")
        t = now()
        upd = dict(fields, status=to, updated_at=t)
        if to in (VALIDATING, RUNNING) and not pipe.hget(jkey, "started_at"):
            upd["started_at"] = t
        if to in FINAL:
            upd["finished_at"] = t
        if to in AT_REST:  # a pause asked for meanwhile is over: the job stopped anyway
            upd.update(pause_requested=0, pause_requested_at=None)
        if to == PAUSED:
            upd["paused_at"] = t
        pipe.multi()
        pipe.hset(jkey, mapping=_encode(upd))
        if artifacts is not None:
            _write_artifacts(pipe, keys, job_id, artifacts)
        if current != to:
            pipe.zrem(keys.jobs(owner, current), job_id)
            pipe.zadd(keys.jobs(owner, to), {job_id: 0})
            pipe.zrem(keys.status(current), job_id)
            pipe.zadd(keys.status(to), {job_id: t})
            # In the same transaction: an SSE reader that sees the final status also sees its event.
            data = dict(event_data or {}, status=to)
            _xadd(pipe, keys, job_id, "status", message or f"job {to}", data, fence)
            webhook_outbox.add_for_transition(r, pipe, keys.prefix, job_id, owner, to, upd)  # same MULTI
        return current

    r.transaction(_tx, jkey)
    return get_job(r, keys, job_id)  # type: ignore[return-value]


def list_jobs(
    r: redis.Redis,
    keys: Keys,
    owner: str,
    status: str | None = None,
    limit: int = 20,
    after: str | None = None,
    match: Callable[[dict[str, Any]], bool] | None = None,
    scan_budget: int = 2000,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; `after` is the last id of the previous page. Returns (jobs, next cursor).

    With `match` (a filter on the decoded job), at most `scan_budget` jobs are read per call: a
    page can then come back short, with a cursor that continues the scan where it stopped."""
    if match is None:
        hi = f"({after}" if after else "+"
        ids = r.zrevrangebylex(keys.jobs(owner, status), hi, "-", start=0, num=limit + 1)
        page, more = ids[:limit], len(ids) > limit
        return _load_jobs(r, keys, page), (page[-1] if more and page else None)
    found: list[dict[str, Any]] = []
    cursor, scanned = after, 0
    while scanned < scan_budget:
        hi = f"({cursor}" if cursor else "+"
        ids = r.zrevrangebylex(
            keys.jobs(owner, status), hi, "-", start=0, num=min(200, scan_budget - scanned)
        )
        if not ids:
            return found, None
        scanned += len(ids)
        for job in _load_jobs(r, keys, ids):
            if match(job):
                if len(found) == limit:
                    return found, found[-1]["id"]
                found.append(job)
        cursor = ids[-1]
    return found, cursor  # budget spent: more may match further on


def _load_jobs(r: redis.Redis, keys: Keys, ids: list[str]) -> list[dict[str, Any]]:
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(keys.job(job_id))
    return [_decode(raw) for raw in pipe.execute() if raw]


def request_cancel(r: redis.Redis, keys: Keys, job_id: str) -> dict[str, Any]:
    """Queued or paused: cancelled at once (it never runs again). Validating/running: raise the
    flag the worker polls; from then on the job can only end `cancelled` (see transition), and a
    pause asked for before loses to it. Already cancelled: unchanged. Succeeded/failed: Conflict.
    One WATCH/MULTI transaction, so a job that finishes meanwhile is a Conflict, never an accepted
    cancel."""
    jkey = keys.job(job_id)

    def _tx(pipe: redis.client.Pipeline) -> None:
        current, owner = pipe.hmget(jkey, "status", "owner")
        if current is None:
            raise KeyError(job_id)
        if current in (SUCCEEDED, FAILED):
            raise Conflict(f"job {job_id} already {current}")
        if current == CANCELLED:
            return
        t = now()
        pipe.multi()
        pipe.hset(
            jkey, mapping={"cancel_requested": "1", "cancel_requested_at": str(t), "updated_at": str(t)}
        )
        if current in (QUEUED, PAUSED):
            pipe.hset(jkey, mapping={"status": CANCELLED, "finished_at": str(t)})
            pipe.zrem(keys.jobs(owner, current), job_id)
            pipe.zadd(keys.jobs(owner, CANCELLED), {job_id: 0})
            pipe.zrem(keys.status(current), job_id)
            pipe.zadd(keys.status(CANCELLED), {job_id: t})
            message = "cancelled before it started" if current == QUEUED else "cancelled while paused"
            _xadd(pipe, keys, job_id, "status", message, {"status": CANCELLED})
            # A final status like any other: its webhook event is queued in the same MULTI.
            webhook_outbox.add_for_transition(r, pipe, keys.prefix, job_id, owner, CANCELLED, {})
        else:
            _xadd(
                pipe,
                keys,
                job_id,
                "cancel_requested",
                "cancel requested; the worker stops at the next step",
                {},
            )

    r.transaction(_tx, jkey)
    return get_job(r, keys, job_id)  # type: ignore[return-value]


def request_pause(r: redis.Redis, keys: Keys, job_id: str) -> dict[str, Any]:
    """Queued: paused at once (a worker that later takes its message skips it). Validating/running:
    raise the pause flag the worker polls (workers/reporter.py Monitor); the engine stops at its
    next training step and the worker moves the job to `paused`. Asked again while that flag is
    up: unchanged. Raises NotPausable (a Conflict) for a succeeded/failed/cancelled job
    (`job_finished`), a paused one (`job_paused`) and one with a cancel request
    (`cancel_pending`: cancel wins); KeyError when the job does not exist. One WATCH/MULTI
    transaction: a job that ends or is cancelled meanwhile is never also paused."""
    jkey = keys.job(job_id)

    def _tx(pipe: redis.client.Pipeline) -> None:
        current, owner, cancel, pause = pipe.hmget(
            jkey, "status", "owner", "cancel_requested", "pause_requested"
        )
        if current is None:
            raise KeyError(job_id)
        if current in FINAL:
            raise NotPausable(f"job {job_id} already {current}; nothing to pause", "job_finished", current)
        if current == PAUSED:
            raise NotPausable(f"job {job_id} is paused already; resume it to go on", "job_paused", current)
        if cancel == "1":
            message = f"job {job_id} has a cancel request; it ends cancelled, not paused"
            raise NotPausable(message, "cancel_pending", current)
        if pause == "1":
            return
        t = now()
        pipe.multi()
        if current == QUEUED:
            pipe.hset(jkey, mapping={"status": PAUSED, "paused_at": str(t), "updated_at": str(t)})
            pipe.zrem(keys.jobs(owner, QUEUED), job_id)
            pipe.zadd(keys.jobs(owner, PAUSED), {job_id: 0})
            pipe.zrem(keys.status(QUEUED), job_id)
            pipe.zadd(keys.status(PAUSED), {job_id: t})
            message = "paused before it started; resume queues it again"
            _xadd(pipe, keys, job_id, "status", message, {"status": PAUSED, "steps_redone": 0})
            return
        flag = {"pause_requested": "1", "pause_requested_at": str(t), "updated_at": str(t)}
        pipe.hset(jkey, mapping=flag)
        message = "pause requested; the worker stops at the next training step"
        _xadd(pipe, keys, job_id, "pause_requested", message, {})

    r.transaction(_tx, jkey)
    return get_job(r, keys, job_id)  # type: ignore[return-value]


def resume_job(r: redis.Redis, keys: Keys, job_id: str) -> dict[str, Any]:
    """paused/failed/cancelled -> queued for a new run that continues from the job's checkpoint:
    error, cancel and pause flags, pause and finish times and the attempt count are cleared (the
    caller checks the checkpoint and enqueues). Raises Conflict in any other status, KeyError
    when the job does not exist."""
    job = transition(
        r,
        keys,
        job_id,
        QUEUED,
        [PAUSED, FAILED, CANCELLED],
        "resumed: queued again to continue from its last checkpoint",
        error=None,
        metrics=None,
        finished_at=None,
        paused_at=None,
        cancel_requested=0,
        cancel_requested_at=None,
        pause_requested=0,
        pause_requested_at=None,
        attempts=0,
    )
    r.hdel(keys.job(job_id), "requeued_at")
    return job


def delete_job(r: redis.Redis, keys: Keys, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
    """Remove a finished job's records in one transaction: the job, its index entries, events,
    artifact index, lease and the idempotency keys that name it. Returns the removed job, or None
    when it does not exist (or, with `owner`, is someone else's). Raises Conflict while it is
    queued, validating or running (cancel it first), InUse (a Conflict naming them) while an
    active job's `weights: job:<id>` names it: the check and the delete are one transaction over
    the owner's active-job indexes, as for datasets, so a job queued meanwhile makes it retry and
    see that job. Files are the caller's (core/storage.py)."""
    jkey = keys.job(job_id)
    job_owner = r.hget(jkey, "owner")
    if job_owner is None or (owner is not None and job_owner != owner):
        return None
    watched = [jkey, keys.idem_of(job_id)] + [keys.jobs(job_owner, s) for s in ACTIVE]

    def _tx(pipe: redis.client.Pipeline) -> dict[str, Any] | None:
        raw = pipe.hgetall(jkey)
        if not raw or raw.get("owner") != job_owner:
            return None
        status = raw.get("status", "")
        if status in ACTIVE:
            raise Conflict(f"job {job_id} is {status}; cancel it first")
        users = jobs_using_job(pipe, keys, job_owner, job_id)
        if users:
            raise InUse(
                f"job {job_id} is used by active jobs: {', '.join(users)} (their weights name "
                f"job:{job_id}); cancel them first, or delete it once they have ended",
                users,
            )
        idem = [k for k in pipe.smembers(keys.idem_of(job_id)) if _idem_names(pipe.get(k), job_id)]
        pipe.multi()
        pipe.delete(
            jkey, keys.events(job_id), keys.artifacts(job_id), keys.lease(job_id), keys.idem_of(job_id)
        )
        if idem:
            pipe.delete(*idem)
        pipe.zrem(keys.jobs(job_owner), job_id)
        pipe.zrem(keys.jobs(job_owner, status), job_id)
        pipe.zrem(keys.status(status), job_id)
        return _decode(raw)

    return r.transaction(_tx, *watched, value_from_callable=True)


def references_of(spec: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What a stored job spec names that the API can delete: ("dataset", id) for `dataset.id`,
    ("job", id) for each `weights: job:<id>` (teacher, student)."""
    spec = spec or {}
    found = []
    ds_id = (spec.get("dataset") or {}).get("id")
    if ds_id:
        found.append(("dataset", ds_id))
    for role in ("teacher", "student"):
        weights = str((spec.get(role) or {}).get("weights") or "")
        if weights.startswith("job:"):
            found.append(("job", weights[4:]))
    return found


def jobs_using(r: Any, keys: Keys, owner: str, kind: str, ref_id: str) -> list[str]:
    """The owner's queued, validating or running jobs whose spec names (`kind`, `ref_id`) (see
    references_of). `r` may be a pipeline in its WATCH phase (reads run at once)."""
    ids = [job_id for status in ACTIVE for job_id in r.zrange(keys.jobs(owner, status), 0, -1)]
    specs = [r.hget(keys.job(job_id), "spec") for job_id in ids]
    return [
        job_id
        for job_id, spec in zip(ids, specs, strict=True)
        if spec and (kind, ref_id) in references_of(json.loads(spec))
    ]


def jobs_using_job(r: Any, keys: Keys, owner: str, job_id: str) -> list[str]:
    """The owner's active jobs whose teacher or student `weights` is `job:<job_id>`."""
    return jobs_using(r, keys, owner, "job", job_id)


def cancel_requested(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    """Whether a cancel was accepted for the job (False when it does not exist)."""
    return r.hget(keys.job(job_id), "cancel_requested") == "1"


def stop_flags(r: redis.Redis, keys: Keys, job_id: str) -> tuple[bool, bool]:
    """(cancel requested, pause requested), read together (the worker's Monitor polls them)."""
    cancel, pause = r.hmget(keys.job(job_id), "cancel_requested", "pause_requested")
    return cancel == "1", pause == "1"


def count_by_status(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """The number of jobs per status, all owners."""
    pipe = r.pipeline(transaction=False)
    for s in STATUSES:
        pipe.zcard(keys.status(s))
    return dict(zip(STATUSES, pipe.execute(), strict=True))


def job_ids_with_status(r: redis.Redis, keys: Keys, status: str) -> list[str]:
    """The ids of every job in `status`, all owners, in the order they entered it."""
    return r.zrange(keys.status(status), 0, -1)
