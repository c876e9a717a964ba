"""Webhooks in Redis: registrations, deliveries (one per event and webhook), the retry schedule and
each webhook's delivery log. Torch-free; the API (app/routes/webhooks.py) and the sender
(workers/webhooks.py) share it. Keys (P = SPKD_REDIS_PREFIX), besides the outbox ones in
core/webhook_outbox.py:

    P:wh:hook:<id>        hash: id, owner, url, events (JSON list), secret, created_at
    P:wh:owner:<owner>    zset (scores 0) of the owner's webhook ids, time-sortable: newest last
    P:wh:log:<id>         zset delivery id -> created_at: the webhook's delivery log (bounded)
    P:wh:delivery:<id>    hash: id, webhook_id, msg_id, type, job_id, body, status, attempts (JSON), ...
    P:wh:due              zset delivery id -> when its next attempt is due (or its claim expires)
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from spkd.core import store
from spkd.core.webhook_outbox import outbox_key, owner_hooks_key

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
SENDER_GROUP = "senders"


class TooMany(Exception):
    """The owner already has the maximum number of webhooks."""


def hook_key(prefix: str, hook_id: str) -> str:
    return f"{prefix}:wh:hook:{hook_id}"


def log_key(prefix: str, hook_id: str) -> str:
    return f"{prefix}:wh:log:{hook_id}"


def delivery_key(prefix: str, delivery_id: str) -> str:
    return f"{prefix}:wh:delivery:{delivery_id}"


def due_key(prefix: str) -> str:
    return f"{prefix}:wh:due"


# ---------------------------------------------------------------- registrations


def _decode_hook(raw: dict[str, str]) -> dict[str, Any]:
    return {
        "id": raw["id"],
        "owner": raw["owner"],
        "url": raw["url"],
        "events": json.loads(raw["events"]),
        "secret": raw["secret"],
        "created_at": float(raw["created_at"]),
    }


def create_webhook(
    r: redis.Redis, prefix: str, owner: str, url: str, events: list[str], secret: str, max_per_owner: int
) -> dict[str, Any]:
    """Register a webhook (WATCH on the owner's set, so two concurrent creations cannot both pass
    the limit). Raises TooMany at `max_per_owner`."""
    hook_id = store.new_id("wh")
    fields = {
        "id": hook_id,
        "owner": owner,
        "url": url,
        "events": json.dumps(events),
        "secret": secret,
        "created_at": f"{time.time():.6f}",
    }
    owner_key = owner_hooks_key(prefix, owner)

    def _tx(pipe: redis.client.Pipeline) -> None:
        if pipe.zcard(owner_key) >= max_per_owner:
            raise TooMany(f"this API key already has {max_per_owner} webhooks; delete one first")
        pipe.multi()
        pipe.hset(hook_key(prefix, hook_id), mapping=fields)
        pipe.zadd(owner_key, {hook_id: 0})

    r.transaction(_tx, owner_key)
    return _decode_hook(fields)


def get_webhook(r: redis.Redis, prefix: str, hook_id: str, owner: str | None = None) -> dict[str, Any] | None:
    """The webhook (with its secret), or None when missing or (with `owner`) someone else's."""
    raw = r.hgetall(hook_key(prefix, hook_id))
    if not raw or (owner is not None and raw.get("owner") != owner):
        return None
    return _decode_hook(raw)


def list_webhooks(r: redis.Redis, prefix: str, owner: str) -> list[dict[str, Any]]:
    """The owner's webhooks, newest first (at most SPKD_WEBHOOK_MAX_PER_KEY: no paging needed)."""
    ids = r.zrevrangebylex(owner_hooks_key(prefix, owner), "+", "-")
    pipe = r.pipeline(transaction=False)
    for hook_id in ids:
        pipe.hgetall(hook_key(prefix, hook_id))
    return [_decode_hook(raw) for raw in pipe.execute() if raw]


def delete_webhook(r: redis.Redis, prefix: str, hook_id: str, owner: str) -> None:
    """Remove the webhook and its log. Its pending deliveries are dropped by the sender, which
    finds the webhook gone."""
    delivery_ids = r.zrange(log_key(prefix, hook_id), 0, -1)
    pipe = r.pipeline(transaction=True)
    pipe.delete(hook_key(prefix, hook_id), log_key(prefix, hook_id))
    pipe.zrem(owner_hooks_key(prefix, owner), hook_id)
    for d in delivery_ids:
        pipe.delete(delivery_key(prefix, d))
    if delivery_ids:
        pipe.zrem(due_key(prefix), *delivery_ids)
    pipe.execute()


# ---------------------------------------------------------------- deliveries


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def event_body(kind: str, occurred_at: float, data: dict[str, Any]) -> str:
    """The JSON body every webhook of this event receives (compact: exactly the bytes signed)."""
    return json.dumps({"type": kind, "timestamp": _iso(occurred_at), "data": data}, separators=(",", ":"))


def fan_out(r: redis.Redis, prefix: str, entry_id: str, entry: dict[str, str], log_size: int) -> list[str]:
    """Turn one outbox entry into one delivery per webhook of its owner subscribed to its type,
    due now, and acknowledge + delete the entry in the same transaction: after a crash either all
    of it happened or the entry is still pending (and another sender claims it).

    Returns the new delivery ids."""
    owner, kind = entry.get("owner", ""), entry.get("type", "")
    hooks = [h for h in list_webhooks(r, prefix, owner) if kind in h["events"]] if owner else []
    now = time.time()
    msg_id = "msg_" + entry_id.replace("-", "_")  # unique per event; the spec forbids '.' in it
    body = event_body(kind, float(entry.get("ts") or now), json.loads(entry.get("data") or "{}"))
    pipe = r.pipeline(transaction=True)
    created = []
    for hook in hooks:
        delivery_id = f"dlv_{entry_id.replace('-', '_')}_{hook['id']}"
        fields = {
            "id": delivery_id,
            "webhook_id": hook["id"],
            "msg_id": msg_id,
            "type": kind,
            "job_id": entry.get("job_id", ""),
            "body": body,
            "status": PENDING,
            "attempts": "[]",
            "created_at": f"{now:.6f}",
            "next_attempt_at": f"{now:.6f}",
        }
        pipe.hset(delivery_key(prefix, delivery_id), mapping=fields)
        pipe.zadd(log_key(prefix, hook["id"]), {delivery_id: now})
        pipe.zadd(due_key(prefix), {delivery_id: now})
        created.append((hook["id"], delivery_id))
    pipe.xack(outbox_key(prefix), SENDER_GROUP, entry_id)
    pipe.xdel(outbox_key(prefix), entry_id)
    pipe.execute()
    for hook_id, _ in created:
        _trim_log(r, prefix, hook_id, log_size)
    return [d for _, d in created]


def _trim_log(r: redis.Redis, prefix: str, hook_id: str, log_size: int) -> None:
    old = r.zrange(log_key(prefix, hook_id), 0, -(log_size + 1))
    if old:
        pipe = r.pipeline(transaction=True)
        pipe.zrem(log_key(prefix, hook_id), *old)
        pipe.zrem(due_key(prefix), *old)
        pipe.delete(*[delivery_key(prefix, d) for d in old])
        pipe.execute()


# Due deliveries, oldest first, claimed by moving their score to the claim's expiry: a sender that
# dies mid-attempt leaves them to be due again when the claim runs out.
_CLAIM = """
local ids = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('zadd', KEYS[1], 'XX', ARGV[2], id) end
return ids
"""


def claim_due(r: redis.Redis, prefix: str, now: float, claim_s: float, count: int) -> list[str]:
    """Up to `count` delivery ids due at `now`, each claimed for `claim_s` seconds."""
    return list(r.eval(_CLAIM, 1, due_key(prefix), f"{now:.6f}", f"{now + claim_s:.6f}", count))


def next_due_in(r: redis.Redis, prefix: str, now: float) -> float | None:
    """Seconds until the next delivery is due (0 when one is due now), None when none waits."""
    first = r.zrange(due_key(prefix), 0, 0, withscores=True)
    return max(0.0, first[0][1] - now) if first else None


def get_delivery(r: redis.Redis, prefix: str, delivery_id: str) -> dict[str, Any] | None:
    raw = r.hgetall(delivery_key(prefix, delivery_id))
    if not raw:
        return None
    out: dict[str, Any] = dict(raw)
    out["attempts"] = json.loads(raw.get("attempts") or "[]")
    for k in ("created_at", "next_attempt_at"):
        out[k] = float(raw[k]) if raw.get(k) else None
    return out


def record_attempt(
    r: redis.Redis, prefix: str, delivery_id: str, attempt: dict[str, Any], status: str, next_at: float | None
) -> None:
    """Append an attempt to the delivery's log and set its status: PENDING with the time of the
    next attempt, or DELIVERED / FAILED (given up), which leaves the retry schedule."""
    key = delivery_key(prefix, delivery_id)
    if not r.exists(key):  # its webhook was deleted meanwhile
        r.zrem(due_key(prefix), delivery_id)
        return
    attempts = json.loads(r.hget(key, "attempts") or "[]") + [attempt]
    pipe = r.pipeline(transaction=True)
    fields = {"attempts": json.dumps(attempts), "status": status, "next_attempt_at": ""}
    if status == PENDING and next_at is not None:
        fields["next_attempt_at"] = f"{next_at:.6f}"
        pipe.zadd(due_key(prefix), {delivery_id: next_at})
    else:
        pipe.zrem(due_key(prefix), delivery_id)
    pipe.hset(key, mapping=fields)
    pipe.execute()


def drop_delivery(r: redis.Redis, prefix: str, delivery_id: str) -> None:
    """Forget a due delivery whose record or webhook is gone."""
    pipe = r.pipeline(transaction=True)
    pipe.zrem(due_key(prefix), delivery_id)
    pipe.delete(delivery_key(prefix, delivery_id))
    pipe.execute()


def list_deliveries(r: redis.Redis, prefix: str, hook_id: str, limit: int) -> list[dict[str, Any]]:
    """The webhook's delivery log, newest first."""
    ids = r.zrevrange(log_key(prefix, hook_id), 0, limit - 1)
    return [d for d in (get_delivery(r, prefix, i) for i in ids) if d is not None]
