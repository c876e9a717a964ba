"""What every module of the store shares: the key layout (`Keys`, see the package docstring), the
job statuses and the store's errors, ids and owners, the client, and how a job hash is encoded."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from spkd.core import jsonsafe

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
    """Unix seconds: every time the store writes."""
    return time.time()


@dataclass(frozen=True)
class Keys:
    """The store's Redis keys under one prefix (the layout: the package docstring)."""

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


# ---------------------------------------------------------------- job hash encoding


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


def _flat(mapping: dict[str, Any]) -> list[str]:
    return [str(x) for kv in mapping.items() for x in kv]


def delete_prefix(r: redis.Redis, prefix: str) -> int:
    """Remove every key under `prefix:` (tests clean up after themselves)."""
    n = 0
    for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        n += r.delete(key)
    return n
