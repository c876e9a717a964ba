"""Dataset records: P:dataset:<id> (the dataset's JSON) and P:datasets:<owner> (ids, newest first);
a dataset used by a queued, running or paused job cannot be deleted. The files are
core/storage.py's."""

from __future__ import annotations

import json
from typing import Any

import redis

from spkd.core import jsonsafe
from spkd.core.store.keys import DATASET_USERS, Conflict, Keys


def save_dataset(r: redis.Redis, keys: Keys, dataset: dict[str, Any]) -> None:
    """Store a dataset record (created or updated) and index it under its owner."""
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.dataset(dataset["id"]), jsonsafe.dumps(dataset))
    pipe.zadd(keys.datasets(dataset["owner"]), {dataset["id"]: 0})
    pipe.execute()


def get_dataset(r: redis.Redis, keys: Keys, ds_id: str, owner: str | None = None) -> dict[str, Any] | None:
    """The dataset, or None when it does not exist or (with `owner`) is someone else's."""
    raw = r.get(keys.dataset(ds_id))
    if not raw:
        return None
    ds = json.loads(raw)
    return ds if owner is None or ds.get("owner") == owner else None


def list_datasets(
    r: redis.Redis, keys: Keys, owner: str, limit: int = 50, after: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The owner's datasets, newest first; `after` is the last id of the previous page.
    Returns (datasets, next cursor or None)."""
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
