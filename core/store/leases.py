"""Who may write a job: the lease a worker holds while it runs one, the fencing token each attempt
takes with it (a runner's writes go through `fenced`, refused once a newer attempt took a token),
the gate that keeps a late write from recreating a deleted job, and the claim of an orphan (an
active job whose lease is gone). The Lua they run is in scripts.py."""

from __future__ import annotations

import json
import os
import secrets
import socket
from typing import Any

import redis

from spkd.common.reporter import Fenced
from spkd.core.store.keys import EVENTS_MAXLEN, Keys, _flat, now
from spkd.core.store.scripts import ACQUIRE, CLAIM_ORPHAN, FENCED, IF_JOB_EXISTS, RELEASE, RENEW


def _if_job_exists(r: redis.Redis, keys: Keys, job_id: str, *commands: list[Any]) -> Any:
    """Run Redis commands atomically, only while the job exists; None when it does not.

    The one gate for writes from outside a status transition (progress, events, attempts,
    artifacts): a late write of a dying worker never recreates a deleted job."""
    body = json.dumps([[str(a) for a in c] for c in commands], ensure_ascii=False)
    return r.register_script(IF_JOB_EXISTS)(keys=[keys.job(job_id)], args=[body])


def fenced(r: redis.Redis, keys: Keys, job_id: str, fence: int, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Run `ops` ((command, key, *args), ...) atomically, only while `fence` is the job's current
    token; returns each command's reply. Raises Fenced (nothing written) otherwise."""
    key_list = [keys.job(job_id)]
    encoded = []
    for cmd, key, *args in ops:
        if key not in key_list:
            key_list.append(key)
        encoded.append([cmd, key_list.index(key) + 1, *(str(a) for a in args)])
    out = r.eval(FENCED, len(key_list), *key_list, str(fence), json.dumps(encoded))
    if out is None:
        raise Fenced(f"job {job_id}: attempt {fence} is no longer current")
    return out


def check_fence(r: redis.Redis, keys: Keys, job_id: str, fence: int) -> None:
    """Raise Fenced unless `fence` is the job's current token (a read: for publishing files)."""
    if r.hget(keys.job(job_id), "fence") != str(fence):
        raise Fenced(f"job {job_id}: attempt {fence} is no longer current")


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
        fence = int(self.r.eval(ACQUIRE, 2, self.key, self.job_key, self.token, self.ttl_ms))
        if fence:
            self.fence = fence
        return bool(fence)

    def holder(self) -> str | None:
        """The token of the lease's current holder, or None when it is free."""
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
        self.r.eval(RELEASE, 1, self.key, held)
        return self.acquire()

    def renew(self) -> bool:
        """Set the lease's TTL back to its full length; False when this holder lost it."""
        return bool(self.r.eval(RENEW, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        """Give the lease up, only while this holder still holds it."""
        self.r.eval(RELEASE, 1, self.key, self.token)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_held(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    """Whether some worker holds the job's lease now."""
    return bool(r.exists(keys.lease(job_id)))


def claim_orphan(r: redis.Redis, keys: Keys, job_id: str, grace_s: float, message: str) -> bool:
    """Mark an active job whose lease is gone as requeued (and log `message`), in one script: a
    worker that takes the lease meanwhile is never told its job was lost. False when it has a
    lease, is not active any more, or was requeued less than `grace_s` ago."""
    t = now()
    entry = {"kind": "info", "message": message, "ts": f"{t:.3f}", "data": "{}"}
    args = [repr(t), grace_s, EVENTS_MAXLEN, *_flat(entry)]
    keys_ = [keys.lease(job_id), keys.job(job_id), keys.events(job_id)]
    return bool(r.eval(CLAIM_ORPHAN, 3, *keys_, *args))
