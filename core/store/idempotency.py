"""Idempotency keys: P:idem:<owner>:<key> binds a key to the body's hash and the job it created
(with a TTL), and P:idem-of:<job id> lists the keys naming a job, so deleting the job forgets them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import redis

from spkd.core import jsonsafe
from spkd.core.store.keys import Keys


def body_hash(body: Any) -> str:
    """sha256 (hex) of a request body in canonical JSON: the same body, the same hash."""
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


def _idem_names(raw: str | None, job_id: str) -> bool:
    return bool(raw) and json.loads(raw).get("job_id") == job_id
