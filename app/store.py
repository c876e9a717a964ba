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
    P:lease:<id>               string: token of the worker running the job (SET NX PX, renewed)
    P:workers                  zset worker name -> last heartbeat (unix seconds); P:worker:<name> info
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from app import jsonsafe

QUEUED, VALIDATING, RUNNING = "queued", "validating", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, VALIDATING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, VALIDATING, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELLED)
EVENTS_MAXLEN = 10_000  # a bound on one job's log; epoch/stage events are far fewer

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"

# JSON-encoded hash fields of a job.
_JSON_FIELDS = ("spec", "progress", "metrics", "error", "warnings")


class Conflict(Exception):
    """A state change that is not allowed from the job's current status."""


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

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

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
    for k in ("created_at", "updated_at", "started_at", "finished_at", "cancel_requested_at"):
        job[k] = float(raw[k]) if raw.get(k) else None
    job["attempts"] = int(raw.get("attempts") or 0)
    job["cancel_requested"] = raw.get("cancel_requested") == "1"
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


def update_job(r: redis.Redis, keys: Keys, job_id: str, **fields: Any) -> None:
    """Fields that do not change the status (progress, stage, metrics, warnings...)."""
    fields["updated_at"] = now()
    r.hset(keys.job(job_id), mapping=_encode(fields))


def transition(
    r: redis.Redis,
    keys: Keys,
    job_id: str,
    to: str,
    allowed_from: Iterable[str],
    message: str | None = None,
    event_data: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Atomically move a job between statuses (WATCH/MULTI), updating every index.

    Raises Conflict when the job is not in one of `allowed_from` (e.g. cancelled meanwhile),
    KeyError when it does not exist.
    """
    allowed = set(allowed_from)
    jkey = keys.job(job_id)

    def _tx(pipe: redis.client.Pipeline) -> str:
        current, owner = pipe.hmget(jkey, "status", "owner")
        if current is None:
            raise KeyError(job_id)
        if current not in allowed:
            raise Conflict(f"job {job_id} is {current}, not one of {sorted(allowed)}")
        t = now()
        upd = dict(fields, status=to, updated_at=t)
        if to in (VALIDATING, RUNNING) and not pipe.hget(jkey, "started_at"):
            upd["started_at"] = t
        if to in FINAL:
            upd["finished_at"] = t
        pipe.multi()
        pipe.hset(jkey, mapping=_encode(upd))
        if current != to:
            pipe.zrem(keys.jobs(owner, current), job_id)
            pipe.zadd(keys.jobs(owner, to), {job_id: 0})
            pipe.zrem(keys.status(current), job_id)
            pipe.zadd(keys.status(to), {job_id: t})
            # In the same transaction: an SSE reader that sees the final status also sees its event.
            _xadd(pipe, keys, job_id, "status", message or f"job {to}", dict(event_data or {}, status=to))
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
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; `after` is the last id of the previous page. Returns (jobs, next cursor)."""
    hi = f"({after}" if after else "+"
    ids = r.zrevrangebylex(keys.jobs(owner, status), hi, "-", start=0, num=limit + 1)
    page, more = ids[:limit], len(ids) > limit
    pipe = r.pipeline(transaction=False)
    for job_id in page:
        pipe.hgetall(keys.job(job_id))
    jobs = [_decode(raw) for raw in pipe.execute() if raw]
    return jobs, (page[-1] if more and page else None)


def request_cancel(r: redis.Redis, keys: Keys, job_id: str) -> dict[str, Any]:
    """Queued: cancelled at once (it never starts). Validating/running: raise the flag the worker
    polls. Already cancelled: unchanged. Succeeded/failed: Conflict."""
    job = get_job(r, keys, job_id)
    if job is None:
        raise KeyError(job_id)
    if job["status"] == CANCELLED:
        return job
    if job["status"] in (SUCCEEDED, FAILED):
        raise Conflict(f"job {job_id} already {job['status']}")
    r.hset(keys.job(job_id), mapping={"cancel_requested": "1", "cancel_requested_at": str(now())})
    try:
        return transition(r, keys, job_id, CANCELLED, [QUEUED], "cancelled before it started")
    except Conflict:
        add_event(r, keys, job_id, "cancel_requested", "cancel requested; the worker stops at the next step")
        return get_job(r, keys, job_id)  # type: ignore[return-value]


def cancel_requested(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    return r.hget(keys.job(job_id), "cancel_requested") == "1"


def count_by_status(r: redis.Redis, keys: Keys) -> dict[str, int]:
    pipe = r.pipeline(transaction=False)
    for s in STATUSES:
        pipe.zcard(keys.status(s))
    return dict(zip(STATUSES, pipe.execute(), strict=True))


def job_ids_with_status(r: redis.Redis, keys: Keys, status: str) -> list[str]:
    return r.zrange(keys.status(status), 0, -1)


# ---------------------------------------------------------------- events


def _xadd(r: Any, keys: Keys, job_id: str, kind: str, message: str, data: dict[str, Any]) -> Any:
    entry = {
        "kind": kind,
        "message": message,
        "ts": f"{now():.3f}",
        "data": jsonsafe.dumps(data, default=str),
    }
    return r.xadd(keys.events(job_id), entry, maxlen=EVENTS_MAXLEN, approximate=True)


def add_event(r: redis.Redis, keys: Keys, job_id: str, kind: str, message: str, **data: Any) -> str:
    return _xadd(r, keys, job_id, kind, message, data)


def _event(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    return {
        "id": entry_id,
        "ts": float(fields.get("ts", 0)),
        "kind": fields.get("kind", ""),
        "message": fields.get("message", ""),
        "data": json.loads(fields.get("data") or "{}"),
    }


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


def set_artifacts(r: redis.Redis, keys: Keys, job_id: str, artifacts: list[dict[str, Any]]) -> None:
    pipe = r.pipeline(transaction=True)
    pipe.delete(keys.artifacts(job_id))
    if artifacts:
        pipe.hset(keys.artifacts(job_id), mapping={a["name"]: jsonsafe.dumps(a) for a in artifacts})
    pipe.execute()


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
        return None
    raw = r.get(keys.idem(owner, key))
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------- leases


_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Lease:
    """The right to run one job: SET NX PX with a random token, renewed by its holder, so a
    redelivered message never runs a job that another worker is still running."""

    def __init__(self, r: redis.Redis, keys: Keys, job_id: str, ttl_s: float, holder: str = "") -> None:
        self.r, self.key, self.ttl_ms = r, keys.lease(job_id), int(ttl_s * 1000)
        # "<host>:<pid>:<random>": lets a worker on the same host see that the holder is dead.
        self.token = f"{holder or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.token, nx=True, px=self.ttl_ms))

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
