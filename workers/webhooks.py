"""The webhook sender: a thread in every `spkd worker` parent process (never in a job process, never
in the API) that turns outbox entries into signed HTTP deliveries.

Each round it
1. takes over outbox entries another sender read but never finished (XAUTOCLAIM after
   SPKD_WEBHOOK_CLAIM_IDLE_S: that sender died), then reads new ones through the consumer group
   (XREADGROUP: each entry goes to one sender), and fans each out into one delivery per subscribed
   webhook of the job's owner (core.webhook_store.fan_out, atomic with the XACK);
2. claims the deliveries that are due (a claim expires, so a sender that dies mid-attempt leaves
   them to the others) and posts them, a few at a time, with a short timeout and no redirects;
   a failure is retried after SPKD_WEBHOOK_BACKOFF_S x 3^(n-1) (+0-10% jitter, or the receiver's
   Retry-After if longer) until SPKD_WEBHOOK_MAX_ATTEMPTS; 410 Gone gives up at once.

Every attempt re-checks the URL against the SSRF guard and connects to the address it checked;
the client's transport (webhook_security.GuardedTransport) checks the address each socket reaches.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import redis

from spkd.core import store, webhook_security, webhook_store
from spkd.core.settings import Settings
from spkd.core.webhook_outbox import outbox_key

log = logging.getLogger("spkd.webhooks")

CONCURRENCY = 4  # deliveries in flight per sender: one slow receiver does not hold up the others
BATCH = 20  # outbox entries read per round
POLL_S = 1.0  # the longest a round blocks: how soon a stop request is seen
USER_AGENT = "spkd-webhooks/1.0"
MAX_RETRY_AFTER_S = 3600.0


class Sender(threading.Thread):
    """One sender. `consumer` names it in the outbox's consumer group (the worker's name)."""

    def __init__(self, settings: Settings, consumer: str, r: redis.Redis | None = None) -> None:
        super().__init__(name="spkd-webhooks", daemon=True)
        self.settings, self.consumer = settings, consumer
        self.prefix = settings.redis_prefix
        self.r = r or store.connect(settings.redis_url)
        self.stopping = threading.Event()
        # A claimed delivery must stay claimed for longer than one attempt can take.
        self.claim_s = max(settings.webhook_claim_idle_s, 2 * settings.webhook_timeout_s + 5)
        # trust_env=False: no proxy from the environment; the sender connects to the address it
        # checked, and the transport checks again the address each socket actually reaches.
        self.http = httpx.Client(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": USER_AGENT},
            transport=webhook_security.GuardedTransport(settings.webhooks_allow_private),
        )
        self.pool = ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="spkd-webhook")
        self._group_ready = False
        self._last_autoclaim = 0.0

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        log.info("webhook sender %s started", self.consumer)
        while not self.stopping.is_set():
            try:
                self.step()
            except redis.RedisError as e:  # Redis restarting: wait and go on
                self._group_ready = False
                log.warning("webhook sender: Redis unavailable (%s)", e)
                self.stopping.wait(1.0)
            except Exception:  # noqa: BLE001 - a bug in one round must not end the sender
                log.exception("webhook sender round failed")
                self.stopping.wait(1.0)
        self._close()

    def step(self) -> int:
        """One round: fan out new (or abandoned) outbox entries, then deliver what is due.
        Blocks on the outbox for at most POLL_S, less when a retry is due sooner. Returns the
        number of delivery attempts made."""
        self._ensure_group()
        entries = self._autoclaim()
        wait = webhook_store.next_due_in(self.r, self.prefix, time.time())
        block_s = 0.0 if entries or wait == 0 else min(POLL_S, POLL_S if wait is None else wait)
        block_ms = int(block_s * 1000)
        res = self.r.xreadgroup(
            webhook_store.SENDER_GROUP,
            self.consumer,
            {outbox_key(self.prefix): ">"},
            count=BATCH,
            block=block_ms or None,  # BLOCK 0 would mean forever
        )
        entries += [e for _, items in (res or []) for e in items]
        for entry_id, fields in entries:
            webhook_store.fan_out(self.r, self.prefix, entry_id, fields or {}, self.settings.webhook_log_size)
        return self.deliver_due()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        # From id 0: entries written before any sender ever ran are delivered too.
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
            self.r.xgroup_create(outbox_key(self.prefix), webhook_store.SENDER_GROUP, id="0", mkstream=True)
        self._group_ready = True

    def _autoclaim(self) -> list[tuple[str, dict[str, str]]]:
        if time.monotonic() - self._last_autoclaim < self.settings.webhook_claim_idle_s / 2:
            return []
        self._last_autoclaim = time.monotonic()
        res = self.r.xautoclaim(
            outbox_key(self.prefix),
            webhook_store.SENDER_GROUP,
            self.consumer,
            min_idle_time=int(self.settings.webhook_claim_idle_s * 1000),
            start_id="0-0",
            count=BATCH,
        )
        claimed = list(res[1]) if res else []
        if claimed:
            log.warning(
                "webhook sender %s took over %d abandoned outbox entries", self.consumer, len(claimed)
            )
        return claimed

    # ------------------------------------------------------------ deliveries

    def deliver_due(self) -> int:
        ids = webhook_store.claim_due(self.r, self.prefix, time.time(), self.claim_s, CONCURRENCY)
        return sum(self.pool.map(self.deliver, ids))

    def deliver(self, delivery_id: str) -> int:
        """Make one attempt of a claimed delivery and record it. Returns 1 if an attempt was made."""
        d = webhook_store.get_delivery(self.r, self.prefix, delivery_id)
        hook = webhook_store.get_webhook(self.r, self.prefix, d["webhook_id"]) if d else None
        if d is None or hook is None:  # the webhook was deleted meanwhile
            webhook_store.drop_delivery(self.r, self.prefix, delivery_id)
            return 0
        if d["status"] != webhook_store.PENDING:  # finished by another sender whose claim had expired
            self.r.zrem(webhook_store.due_key(self.prefix), delivery_id)
            return 0
        attempt, retry_after, gone = self.attempt(hook, d)
        n = len(d["attempts"]) + 1
        next_at = None
        if attempt["error"] is None:
            status = webhook_store.DELIVERED
        elif gone or n >= self.settings.webhook_max_attempts:
            status = webhook_store.FAILED
        else:
            status = webhook_store.PENDING
            next_at = time.time() + max(self.backoff_s(n), min(retry_after or 0.0, MAX_RETRY_AFTER_S))
        webhook_store.record_attempt(self.r, self.prefix, delivery_id, attempt, status, next_at)
        log.info(
            "webhook %s %s %s attempt %d: %s",
            hook["id"],
            d["type"],
            d["job_id"],
            n,
            attempt["error"] or f"HTTP {attempt['status_code']}",
        )
        return 1

    def backoff_s(self, attempts_made: int) -> float:
        """Delay after the `attempts_made`-th failure: base x 3^(n-1), plus 0-10% jitter so the
        retries of many deliveries do not arrive together."""
        base = self.settings.webhook_backoff_s * 3 ** (attempts_made - 1)
        return base * (1 + random.uniform(0, 0.1))

    def attempt(self, hook: dict[str, Any], d: dict[str, Any]) -> tuple[dict[str, Any], float | None, bool]:
        """POST the delivery once. Returns (the attempt's log entry, the receiver's Retry-After in
        seconds if any, whether it answered 410 Gone)."""
        at, t0 = time.time(), time.monotonic()
        entry: dict[str, Any] = {"at": at, "status_code": None, "error": None, "duration_ms": 0.0}
        retry_after, gone = None, False
        try:
            target = webhook_security.check_url(hook["url"], self.settings.webhooks_allow_private)
            body = d["body"].encode()
            ts = int(time.time())
            headers = {
                "content-type": "application/json",
                "host": target.host_header(),
                "webhook-id": d["msg_id"],
                "webhook-timestamp": str(ts),
                "webhook-signature": webhook_security.sign(hook["secret"], d["msg_id"], ts, body),
            }
            with self.http.stream(
                "POST",
                target.pinned_url(),
                content=body,
                headers=headers,
                extensions={"sni_hostname": target.host},
            ) as resp:
                entry["status_code"] = resp.status_code
                if not 200 <= resp.status_code < 300:
                    entry["error"] = _http_error(resp)
                    retry_after = _retry_after(resp.headers.get("retry-after"))
                    gone = resp.status_code == 410
        except webhook_security.UrlRefused as e:
            entry["error"] = f"{e.code}: {e.message}"
        except httpx.TimeoutException as e:
            entry["error"] = f"timeout after {self.settings.webhook_timeout_s:g} s ({type(e).__name__})"
        except httpx.HTTPError as e:
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)
        return entry, retry_after, gone

    # ------------------------------------------------------------ shutdown

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish the attempts in flight and stop (waits up to one attempt's timeout)."""
        self.stopping.set()
        if self.is_alive():
            self.join(timeout_s if timeout_s is not None else self.settings.webhook_timeout_s + POLL_S + 2)

    def _close(self) -> None:
        self.pool.shutdown(wait=True)
        self.http.close()
        # Leave the group tidy, unless entries are still pending here (another sender claims them).
        with contextlib.suppress(redis.RedisError):
            key, group = outbox_key(self.prefix), webhook_store.SENDER_GROUP
            if not self.r.xpending_range(key, group, "-", "+", 1, consumername=self.consumer):
                self.r.xgroup_delconsumer(key, group, self.consumer)
        log.info("webhook sender %s stopped", self.consumer)


def _http_error(resp: httpx.Response) -> str:
    if 300 <= resp.status_code < 400:
        where = resp.headers.get("location")
        return f"HTTP {resp.status_code}: redirects are not followed (Location: {where})"
    return f"HTTP {resp.status_code}"


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: ignored, the backoff applies
        return None


# ---------------------------------------------------------------- the worker's sender


_sender: Sender | None = None


def start(settings: Settings, consumer: str) -> Sender:
    """Start this process's sender (the `spkd worker` parent calls it once it is ready)."""
    global _sender
    _sender = Sender(settings, consumer)
    _sender.start()
    return _sender


def stop() -> None:
    """Stop this process's sender, if one runs (worker shutdown)."""
    if _sender is not None:
        _sender.stop()
