"""Worker heartbeats: P:workers (name -> last heartbeat, unix seconds) and P:worker:<name> (what the
worker says about itself, expiring with its heartbeat)."""

from __future__ import annotations

import json
from typing import Any

import redis

from spkd.core import jsonsafe
from spkd.core.store.keys import Keys, now


def heartbeat(r: redis.Redis, keys: Keys, name: str, info: dict[str, Any], ttl_s: float) -> None:
    """Record that worker `name` is alive now, with its `info` (kept for `ttl_s` seconds)."""
    pipe = r.pipeline(transaction=False)
    pipe.zadd(keys.workers(), {name: now()})
    pipe.set(keys.worker(name), jsonsafe.dumps(info), ex=max(1, int(ttl_s)))
    pipe.execute()


def remove_worker(r: redis.Redis, keys: Keys, name: str) -> None:
    """Forget a worker (it shuts down)."""
    r.zrem(keys.workers(), name)
    r.delete(keys.worker(name))


def live_workers(r: redis.Redis, keys: Keys, ttl_s: float, queue: str | None = None) -> list[dict[str, Any]]:
    """Workers heard from within `ttl_s` seconds, each its info plus `name`; drops the
    others from the index. `queue`: only the workers of that queue (a service's own)."""
    cutoff = now() - ttl_s
    r.zremrangebyscore(keys.workers(), "-inf", cutoff)  # forget the dead
    names = r.zrangebyscore(keys.workers(), cutoff, "+inf")
    infos = r.mget([keys.worker(n) for n in names]) if names else []
    live = [dict(json.loads(i) if i else {}, name=n) for n, i in zip(names, infos, strict=True)]
    return [w for w in live if queue is None or w.get("queue") == queue]


def most_devices(workers: list[dict[str, Any]]) -> int:
    """The most devices one of `workers` owns (`spkd worker --gpus`; a worker without a group owns
    one), 0 when there is none: a job asking for more waits in its queue."""
    return max((int(w.get("devices") or 1) for w in workers), default=0)
