"""A job's artifact registry: the hash P:artifacts:<id>, name -> {"name", "size", "sha256"}. The
files themselves are core/storage.py's."""

from __future__ import annotations

import json
from typing import Any

import redis

from spkd.core import jsonsafe
from spkd.core.store.keys import Keys, _flat
from spkd.core.store.leases import _if_job_exists, fenced


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
    """The job's registered artifacts, sorted by name ([] when it has none)."""
    return sorted(
        (json.loads(v) for v in r.hgetall(keys.artifacts(job_id)).values()), key=lambda a: a["name"]
    )


def get_artifact(r: redis.Redis, keys: Keys, job_id: str, name: str) -> dict[str, Any] | None:
    """One registered artifact of the job, or None when it has none by that name."""
    raw = r.hget(keys.artifacts(job_id), name)
    return json.loads(raw) if raw else None
