"""The Redis job store: jobs, events, artifacts, datasets, idempotency keys, leases, heartbeats.

Torch-free and Celery-free: the API and the workers both import it. Every function takes a redis
client (decode_responses=True) and a key prefix, so tests run against the real Redis under their
own prefix. Keys (P = SPKD_REDIS_PREFIX):

    P:job:<id>                 hash: the job (JSON-encoded fields where structured)
    P:jobs:<owner>             zset, all scores 0, members = job ids (time-sortable): newest first
    P:jobs:<owner>:<status>    the same, per status (status filter without scanning)
    P:status:<status>          zset of job ids per status, all owners (metrics, recovery)
    P:events:<id>              stream of events (XADD / XRANGE / XREAD BLOCK for SSE)
    P:artifacts:<id>           hash name -> {"name", "size", "sha256"}
    P:dataset:<id>             string: the dataset JSON;  P:datasets:<owner> zset like jobs
    P:idem:<owner>:<key>       string: {"body": sha256, "job_id"} with a TTL
    P:idem-of:<job id>         set of the P:idem keys naming that job (removed with the job)
    P:store_id                 string: this namespace's random id (core/storage.py folder markers)
    P:lease:<id>               string: token of the worker running the job (SET NX PX, renewed)
                               (its fencing token is the job hash's `fence` field, see Lease)
    P:workers                  zset worker name -> last heartbeat (unix seconds); P:worker:<name> info
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from common.reporter import Fenced
from core import jsonsafe, webhook_outbox

QUEUED, VALIDATING, RUNNING, PAUSED = "queued", "validating", "running", "paused"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, VALIDATING, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, VALIDATING, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELLED)
# No worker runs it and none will until someone acts (resume): retention counts these from the
# moment they entered the status, and the orphan sweep never touches them.
AT_REST = (PAUSED, *FINAL)
DATASET_USERS = (*ACTIVE, PAUSED)  # jobs whose dataset cannot be deleted under them
EVENTS_MAXLEN = 10_000  # a bound on one job's log; epoch/stage events are far fewer

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"

# JSON-encoded hash fields of a job.
_JSON_FIELDS = ("spec", "progress", "metrics", "error", "warnings")


class Conflict(Exception):
    """A state change that is not allowed from the job's current status."""


class InUse(Conflict):
    """A delete refused while active jobs name the record (`dataset.id`, `weights: job:<id>`);
    `jobs` lists their ids."""

    def __init__(self, message: str, jobs: list[str]) -> None:
        super().__init__(message)
        self.jobs = jobs


class CancelPending(Conflict):
    """A final status other than `cancelled` (or `paused`) for a job whose cancel was accepted:
    refused, so a 200 to POST .../cancel is always followed by `cancelled`."""


class NotPausable(Conflict):
    """A pause refused: `code` says why (`job_finished`, `job_paused`, `cancel_pending`) and
    `status` is the job's status when it was refused."""

    def __init__(self, message: str, code: str, status: str) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def new_id(kind: str) -> str:
    """`job_` / `ds_` + 10 chars of milliseconds + 10 random: unique and lexically time-ordered."""
    ms = int(time.time() * 1000)
    stamp = "".join(_CROCKFORD[(ms >> (5 * i)) & 31] for i in reversed(range(10)))
    rand = "".join(secrets.choice(_CROCKFORD) for _ in range(10))
    return f"{kind}_{stamp}{rand}"


def owner_of(api_key: str) -> str:
    """The stored owner: a hash of the key, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class Keys:
    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def jobs(self, owner: str, status: str | None = None) -> str:
        return f"{self.prefix}:jobs:{owner}" + (f":{status}" if status else "")

    def status(self, status: str) -> str:
        return f"{self.prefix}:status:{status}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def artifacts(self, job_id: str) -> str:
        return f"{self.prefix}:artifacts:{job_id}"

    def dataset(self, ds_id: str) -> str:
        return f"{self.prefix}:dataset:{ds_id}"

    def datasets(self, owner: str) -> str:
        return f"{self.prefix}:datasets:{owner}"

    def idem(self, owner: str, key: str) -> str:
        return f"{self.prefix}:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    def idem_of(self, job_id: str) -> str:
        return f"{self.prefix}:idem-of:{job_id}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    def store_id(self) -> str:
        return f"{self.prefix}:store_id"

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"


# ---------------------------------------------------------------- clients


_clients: dict[tuple[int, str], redis.Redis] = {}


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """One client per process and URL: a forked worker child never reuses its parent's sockets."""
    key = (os.getpid(), url)
    if key not in _clients:
        opts = {"decode_responses": True, "socket_connect_timeout": 2, "socket_timeout": 10}
        opts.update(kwargs)
        _clients[key] = redis.Redis.from_url(url, **opts)
    return _clients[key]


# ---------------------------------------------------------------- jobs


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in fields.items():
        if k in _JSON_FIELDS:
            out[k] = jsonsafe.dumps(v)
        elif v is None:
            out[k] = ""
        else:
            out[k] = str(v)
    return out


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    job: dict[str, Any] = dict(raw)
    for k in _JSON_FIELDS:
        job[k] = json.loads(raw[k]) if raw.get(k) else None
    times = ("created_at", "updated_at", "started_at", "finished_at", "cancel_requested_at")
    for k in (*times, "pause_requested_at", "paused_at"):
        job[k] = float(raw[k]) if raw.get(k) else None
    job["attempts"] = int(raw.get("attempts") or 0)
    job["cancel_requested"] = raw.get("cancel_requested") == "1"
    job["pause_requested"] = raw.get("pause_requested") == "1"
    return job


def create_job(
    r: redis.Redis, keys: Keys, owner: str, spec: dict[str, Any], job_id: str | None = None
) -> dict[str, Any]:
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


# Runs the commands (a JSON list of [command, key, args...]) only while the job's hash exists.
_IF_JOB_EXISTS = """
if redis.call('exists', KEYS[1]) == 0 then return false end
local out
for _, cmd in ipairs(cjson.decode(ARGV[1])) do out = redis.call(unpack(cmd)) end
return out
"""


def _if_job_exists(r: redis.Redis, keys: Keys, job_id: str, *commands: list[Any]) -> Any:
    """Run Redis commands atomically, only while the job exists; None when it does not.

    The one gate for writes from outside a status transition (progress, events, attempts,
    artifacts): a late write of a dying worker never recreates a deleted job."""
    body = json.dumps([[str(a) for a in c] for c in commands], ensure_ascii=False)
    return r.register_script(_IF_JOB_EXISTS)(keys=[keys.job(job_id)], args=[body])


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


def _idem_names(raw: str | None, job_id: str) -> bool:
    return bool(raw) and json.loads(raw).get("job_id") == job_id


def cancel_requested(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    return r.hget(keys.job(job_id), "cancel_requested") == "1"


def stop_flags(r: redis.Redis, keys: Keys, job_id: str) -> tuple[bool, bool]:
    """(cancel requested, pause requested), read together (the worker's Monitor polls them)."""
    cancel, pause = r.hmget(keys.job(job_id), "cancel_requested", "pause_requested")
    return cancel == "1", pause == "1"


def count_by_status(r: redis.Redis, keys: Keys) -> dict[str, int]:
    pipe = r.pipeline(transaction=False)
    for s in STATUSES:
        pipe.zcard(keys.status(s))
    return dict(zip(STATUSES, pipe.execute(), strict=True))


def job_ids_with_status(r: redis.Redis, keys: Keys, status: str) -> list[str]:
    return r.zrange(keys.status(status), 0, -1)


# ---------------------------------------------------------------- events


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
    lo = f"({after}" if after else "-"
    return [_event(i, f) for i, f in r.xrange(keys.events(job_id), lo, "+", count=limit)]


async def aread_events(ar: Any, keys: Keys, job_id: str, after: str, block_ms: int) -> list[dict[str, Any]]:
    """Async XREAD BLOCK for the SSE stream (`ar` is a redis.asyncio client)."""
    # BLOCK 0 means "forever" to Redis: a non-blocking read must send no BLOCK at all.
    res = await ar.xread({keys.events(job_id): after or "0-0"}, count=500, block=block_ms or None)
    return [_event(i, f) for _, entries in (res or []) for i, f in entries]


async def aget_job_fields(ar: Any, keys: Keys, job_id: str, *names: str) -> list[str | None]:
    return await ar.hmget(keys.job(job_id), *names)


# ---------------------------------------------------------------- artifacts


def _write_artifacts(pipe: Any, keys: Keys, job_id: str, artifacts: list[dict[str, Any]]) -> None:
    pipe.delete(keys.artifacts(job_id))
    if artifacts:
        pipe.hset(keys.artifacts(job_id), mapping={a["name"]: jsonsafe.dumps(a) for a in artifacts})


def set_artifacts(
    r: redis.Redis, keys: Keys, job_id: str, artifacts: list[dict[str, Any]], fence: int | None = None
) -> None:
    """Replace the job's artifact registry; with `fence` only while that token is current."""
    if fence is not None:
        ops: list[tuple[Any, ...]] = [("del", keys.artifacts(job_id))]
        if artifacts:
            ops.append(
                ("hset", keys.artifacts(job_id), *_flat({a["name"]: jsonsafe.dumps(a) for a in artifacts}))
            )
        fenced(r, keys, job_id, fence, ops)
        return
    commands: list[list[Any]] = [["DEL", keys.artifacts(job_id)]]
    if artifacts:
        flat = [x for a in artifacts for x in (a["name"], jsonsafe.dumps(a))]
        commands.append(["HSET", keys.artifacts(job_id), *flat])
    _if_job_exists(r, keys, job_id, *commands)  # never recreates a deleted job's index


def list_artifacts(r: redis.Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    return sorted(
        (json.loads(v) for v in r.hgetall(keys.artifacts(job_id)).values()), key=lambda a: a["name"]
    )


def get_artifact(r: redis.Redis, keys: Keys, job_id: str, name: str) -> dict[str, Any] | None:
    raw = r.hget(keys.artifacts(job_id), name)
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------- datasets


def save_dataset(r: redis.Redis, keys: Keys, dataset: dict[str, Any]) -> None:
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.dataset(dataset["id"]), jsonsafe.dumps(dataset))
    pipe.zadd(keys.datasets(dataset["owner"]), {dataset["id"]: 0})
    pipe.execute()


def get_dataset(r: redis.Redis, keys: Keys, ds_id: str, owner: str | None = None) -> dict[str, Any] | None:
    raw = r.get(keys.dataset(ds_id))
    if not raw:
        return None
    ds = json.loads(raw)
    return ds if owner is None or ds.get("owner") == owner else None


def list_datasets(
    r: redis.Redis, keys: Keys, owner: str, limit: int = 50, after: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    hi = f"({after}" if after else "+"
    ids = r.zrevrangebylex(keys.datasets(owner), hi, "-", start=0, num=limit + 1)
    page, more = ids[:limit], len(ids) > limit
    raws = r.mget([keys.dataset(i) for i in page]) if page else []
    return [json.loads(x) for x in raws if x], (page[-1] if more and page else None)


def jobs_using_dataset(r: Any, keys: Keys, owner: str, ds_id: str) -> list[str]:
    """The owner's queued, validating, running or paused jobs (a paused one goes on from its
    checkpoint on the same data) whose spec names `dataset.id` = ds_id."""
    ids = [job_id for status in DATASET_USERS for job_id in r.zrange(keys.jobs(owner, status), 0, -1)]
    specs = [r.hget(keys.job(job_id), "spec") for job_id in ids]
    return [
        job_id
        for job_id, spec in zip(ids, specs, strict=True)
        if spec and (json.loads(spec).get("dataset") or {}).get("id") == ds_id
    ]


def delete_dataset(r: redis.Redis, keys: Keys, ds_id: str, owner: str | None = None) -> dict[str, Any] | None:
    """Remove a dataset's record. Returns it, or None when it does not exist (or, with `owner`, is
    someone else's). Raises Conflict naming the jobs while a queued, running or paused job uses
    it; the check and the delete are one transaction over the owner's indexes of those statuses,
    so a job queued meanwhile makes it retry and see that job. The folder is the caller's
    (core/storage.py)."""
    ds = get_dataset(r, keys, ds_id, owner)
    if ds is None:
        return None
    watched = [keys.dataset(ds_id)] + [keys.jobs(ds["owner"], s) for s in DATASET_USERS]

    def _tx(pipe: redis.client.Pipeline) -> dict[str, Any] | None:
        if not pipe.exists(keys.dataset(ds_id)):
            return None
        users = jobs_using_dataset(pipe, keys, ds["owner"], ds_id)
        if users:
            names = ", ".join(users)
            raise Conflict(
                f"dataset {ds_id} is used by queued, running or paused jobs: {names}; cancel them first"
            )
        pipe.multi()
        pipe.delete(keys.dataset(ds_id))
        pipe.zrem(keys.datasets(ds["owner"]), ds_id)
        return ds

    return r.transaction(_tx, *watched, value_from_callable=True)


# ---------------------------------------------------------------- idempotency


def body_hash(body: Any) -> str:
    return hashlib.sha256(jsonsafe.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def claim_idempotency_key(
    r: redis.Redis, keys: Keys, owner: str, key: str, body_sha: str, job_id: str, ttl_s: int
) -> dict[str, str] | None:
    """Atomically bind (owner, key) to this body and job id. Returns None when claimed, or the
    earlier binding {"body", "job_id"} when the key was used before."""
    record = jsonsafe.dumps({"body": body_sha, "job_id": job_id})
    if r.set(keys.idem(owner, key), record, nx=True, ex=ttl_s):
        # The reverse index: deleting the job also forgets the key (a retry then makes a new job).
        pipe = r.pipeline(transaction=True)
        pipe.sadd(keys.idem_of(job_id), keys.idem(owner, key))
        pipe.expire(keys.idem_of(job_id), ttl_s)
        pipe.execute()
        return None
    raw = r.get(keys.idem(owner, key))
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------- leases


# Fencing. Every attempt at a job takes a token, HINCRBY job.fence, in the same script that sets
# its lease: tokens only grow, and the newest attempt holds the largest. A runner's writes run in
# _FENCED: one script that compares the job's token with the writer's and then does the writes,
# so nothing can slip in between (a deleted job has no token: its late writes are refused too).
_ACQUIRE = """
if redis.call('exists', KEYS[2]) == 0 then return 0 end
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('hdel', KEYS[2], 'requeued_at')
return redis.call('hincrby', KEYS[2], 'fence', 1)
"""
_FENCED = """
if redis.call('hget', KEYS[1], 'fence') ~= ARGV[1] then return false end
local out = {}
for i, op in ipairs(cjson.decode(ARGV[2])) do
  local args = {}
  for j = 3, #op do args[#args + 1] = op[j] end
  out[i] = redis.call(op[1], KEYS[op[2]], unpack(args))
end
return out
"""


def _flat(mapping: dict[str, Any]) -> list[str]:
    return [str(x) for kv in mapping.items() for x in kv]


def fenced(r: redis.Redis, keys: Keys, job_id: str, fence: int, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Run `ops` ((command, key, *args), ...) atomically, only while `fence` is the job's current
    token; returns each command's reply. Raises Fenced (nothing written) otherwise."""
    key_list = [keys.job(job_id)]
    encoded = []
    for cmd, key, *args in ops:
        if key not in key_list:
            key_list.append(key)
        encoded.append([cmd, key_list.index(key) + 1, *(str(a) for a in args)])
    out = r.eval(_FENCED, len(key_list), *key_list, str(fence), json.dumps(encoded))
    if out is None:
        raise Fenced(f"job {job_id}: attempt {fence} is no longer current")
    return out


def check_fence(r: redis.Redis, keys: Keys, job_id: str, fence: int) -> None:
    """Raise Fenced unless `fence` is the job's current token (a read: for publishing files)."""
    if r.hget(keys.job(job_id), "fence") != str(fence):
        raise Fenced(f"job {job_id}: attempt {fence} is no longer current")


_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Lease:
    """The right to run one job: SET NX PX with a random token, renewed by its holder, so a
    redelivered message never runs a job that another worker is still running.

    Acquiring it also takes the attempt's fencing token (`fence`, the job's counter incremented in
    the same script): a holder frozen past its TTL and then thawed still believes it runs the job,
    so the lease alone cannot stop it; its writes carry its `fence` and are refused once a newer
    attempt took one (store.fenced, transition(fence=...))."""

    def __init__(self, r: redis.Redis, keys: Keys, job_id: str, ttl_s: float, holder: str = "") -> None:
        self.r, self.key, self.ttl_ms = r, keys.lease(job_id), int(ttl_s * 1000)
        self.job_key = keys.job(job_id)
        # "<host>:<pid>:<random>": lets a worker on the same host see that the holder is dead.
        self.token = f"{holder or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        self.fence: int | None = None  # this attempt's fencing token, once acquired

    def acquire(self) -> bool:
        """Set the lease if free and the job exists; then `fence` is this attempt's token."""
        fence = int(self.r.eval(_ACQUIRE, 2, self.key, self.job_key, self.token, self.ttl_ms))
        if fence:
            self.fence = fence
        return bool(fence)

    def holder(self) -> str | None:
        return self.r.get(self.key)

    def take_over_dead_local_holder(self) -> bool:
        """Acquire a lease whose holder was a process on this host that no longer exists (a job
        process killed mid-run): no need to wait for the TTL. Compare-and-delete, then acquire."""
        held = self.holder()
        if not held or held.count(":") < 2:
            return False
        host, pid, _ = held.rsplit(":", 2)
        if host != socket.gethostname() or not pid.isdigit() or _pid_alive(int(pid)):
            return False
        self.r.eval(_RELEASE, 1, self.key, held)
        return self.acquire()

    def renew(self) -> bool:
        return bool(self.r.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        self.r.eval(_RELEASE, 1, self.key, self.token)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_held(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    return bool(r.exists(keys.lease(job_id)))


_CLAIM_ORPHAN = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local status = redis.call('hget', KEYS[2], 'status')
if status ~= 'validating' and status ~= 'running' then return 0 end
local at = tonumber(redis.call('hget', KEYS[2], 'requeued_at') or '') or 0
if tonumber(ARGV[1]) - at < tonumber(ARGV[2]) then return 0 end
redis.call('hset', KEYS[2], 'requeued_at', ARGV[1], 'updated_at', ARGV[1])
redis.call('xadd', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return 1
"""


def claim_orphan(r: redis.Redis, keys: Keys, job_id: str, grace_s: float, message: str) -> bool:
    """Mark an active job whose lease is gone as requeued (and log `message`), in one script: a
    worker that takes the lease meanwhile is never told its job was lost. False when it has a
    lease, is not active any more, or was requeued less than `grace_s` ago."""
    t = now()
    entry = {"kind": "info", "message": message, "ts": f"{t:.3f}", "data": "{}"}
    args = [repr(t), grace_s, EVENTS_MAXLEN, *_flat(entry)]
    keys_ = [keys.lease(job_id), keys.job(job_id), keys.events(job_id)]
    return bool(r.eval(_CLAIM_ORPHAN, 3, *keys_, *args))


# ---------------------------------------------------------------- worker heartbeats


def heartbeat(r: redis.Redis, keys: Keys, name: str, info: dict[str, Any], ttl_s: float) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.zadd(keys.workers(), {name: now()})
    pipe.set(keys.worker(name), jsonsafe.dumps(info), ex=max(1, int(ttl_s)))
    pipe.execute()


def remove_worker(r: redis.Redis, keys: Keys, name: str) -> None:
    r.zrem(keys.workers(), name)
    r.delete(keys.worker(name))


def live_workers(r: redis.Redis, keys: Keys, ttl_s: float) -> list[dict[str, Any]]:
    cutoff = now() - ttl_s
    r.zremrangebyscore(keys.workers(), "-inf", cutoff)  # forget the dead
    names = r.zrangebyscore(keys.workers(), cutoff, "+inf")
    infos = r.mget([keys.worker(n) for n in names]) if names else []
    return [dict(json.loads(i) if i else {}, name=n) for n, i in zip(names, infos, strict=True)]


def delete_prefix(r: redis.Redis, prefix: str) -> int:
    """Remove every key under `prefix:` (tests clean up after themselves)."""
    n = 0
    for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        n += r.delete(key)
    return n


# ---------------------------------------------------------------- ops histograms (Prometheus)
# Recorded by workers when a job ends, read by the API's /metrics from any process.
DURATION_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
MEMORY_BUCKETS = tuple(float(2**g) * 2**30 for g in range(0, 9))  # 1 GiB .. 256 GiB


def _observe(pipe: Any, keys: Keys, name: str, label: str, value: float, buckets: tuple[float, ...]) -> None:
    key = f"{keys.prefix}:metrics:{name}"
    for b in buckets:
        if value <= b:
            pipe.hincrby(key, f"{label}|{b:g}", 1)
    pipe.hincrby(key, f"{label}|+Inf", 1)
    pipe.hincrbyfloat(key, f"{label}|sum", value)


def observe_finished_job(r: redis.Redis, keys: Keys, job_id: str) -> None:
    """Record a finished job in the ops histograms: its run time by final status, each stage's
    seconds (from metrics.json's `timing`) and its GPU memory peak. Best effort: a job record that
    lacks a field skips that histogram."""
    job = get_job(r, keys, job_id)
    if job is None or job["status"] not in FINAL or not job.get("started_at") or not job.get("finished_at"):
        return
    pipe = r.pipeline(transaction=False)
    duration = max(0.0, job["finished_at"] - job["started_at"])
    _observe(pipe, keys, "job_duration_seconds", job["status"], duration, DURATION_BUCKETS)
    metrics = job.get("metrics") or {}
    for stage, seconds in (metrics.get("timing") or {}).items():
        if isinstance(seconds, int | float):
            _observe(pipe, keys, "stage_duration_seconds", stage, float(seconds), DURATION_BUCKETS)
    peak = metrics.get("gpu_memory_peak_bytes")
    if isinstance(peak, int | float):
        _observe(pipe, keys, "job_gpu_memory_peak_bytes", "", float(peak), MEMORY_BUCKETS)
    pipe.execute()


def read_histogram(r: redis.Redis, keys: Keys, name: str) -> dict[str, dict[str, float]]:
    """{label: {"<bucket bound>"|"+Inf"|"sum": value}} of one ops histogram (cumulative buckets)."""
    out: dict[str, dict[str, float]] = {}
    for field, value in r.hgetall(f"{keys.prefix}:metrics:{name}").items():
        label, _, bound = field.rpartition("|")
        out.setdefault(label, {})[bound] = float(value)
    return out
