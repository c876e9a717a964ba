"""Fencing tokens, in-process against the real Redis: once a newer attempt took a job over, every
write of the older attempt (event, progress, status, artifacts, attempt count, file publication)
is refused with Fenced and changes nothing. The end-to-end freeze/thaw test with real worker
processes is tests/workers/test_fencing_freeze.py."""

from __future__ import annotations

import pytest

from spkd.common.reporter import Fenced, Progress
from spkd.core import store
from spkd.workers.reporter import Monitor, RedisReporter
from tests.helpers import KEY_A
from tests.workers.test_runner import base_spec


def _take_over(r, keys, job_id: str) -> tuple[store.Lease, store.Lease]:
    """Attempt 1 holds the job; its lease lapses (it was frozen); attempt 2 takes the job."""
    old = store.Lease(r, keys, job_id, 30)
    assert old.acquire()
    r.delete(keys.lease(job_id))  # what the TTL does to a frozen holder
    new = store.Lease(r, keys, job_id, 30)
    assert new.acquire()
    return old, new


def _snapshot(r, keys, job_id: str) -> tuple:
    return (
        r.hgetall(keys.job(job_id)),
        r.xlen(keys.events(job_id)),
        r.hgetall(keys.artifacts(job_id)),
    )


def test_tokens_grow_with_every_attempt(r, keys) -> None:
    job_id = store.create_job(r, keys, "o", base_spec())["id"]
    tokens = []
    for _ in range(3):
        lease = store.Lease(r, keys, job_id, 30)
        assert lease.acquire()
        assert not store.Lease(r, keys, job_id, 30).acquire()  # held: no token for a second runner
        tokens.append(lease.fence)
        lease.release()
    assert tokens == sorted(set(tokens)) and len(tokens) == 3


def test_stale_attempt_writes_are_refused_and_change_nothing(r, keys) -> None:
    job_id = store.create_job(r, keys, "o", base_spec())["id"]
    old, new = _take_over(r, keys, job_id)
    store.transition(r, keys, job_id, store.RUNNING, store.ACTIVE, fence=new.fence, worker="w2")
    store.update_job(r, keys, job_id, fence=new.fence, progress={"stage": "distill", "step": 7})
    before = _snapshot(r, keys, job_id)

    artifact = {"name": "student.onnx", "size": 1, "sha256": "0" * 64}
    stale_writes = {
        "event": lambda: store.add_event(r, keys, job_id, "epoch_end", "x", fence=old.fence, epoch=1),
        "progress": lambda: store.update_job(r, keys, job_id, fence=old.fence, progress={"step": 1}),
        "worker field": lambda: store.update_job(r, keys, job_id, fence=old.fence, worker="w1"),
        "attempts": lambda: store.bump_attempts(r, keys, job_id, old.fence),
        "artifacts": lambda: store.set_artifacts(r, keys, job_id, [artifact], fence=old.fence),
        "succeeded": lambda: store.transition(
            r, keys, job_id, store.SUCCEEDED, [store.RUNNING], fence=old.fence, artifacts=[artifact]
        ),
        "failed": lambda: store.transition(r, keys, job_id, store.FAILED, store.ACTIVE, fence=old.fence),
        "file publication": lambda: store.check_fence(r, keys, job_id, old.fence),
    }
    for name, write in stale_writes.items():
        with pytest.raises(Fenced):
            write()
        assert _snapshot(r, keys, job_id) == before, f"the stale {name} write changed the store"

    # The current attempt writes as usual, and its events say which attempt wrote them.
    store.add_event(r, keys, job_id, "epoch_end", "x", fence=new.fence, epoch=1)
    store.transition(r, keys, job_id, store.SUCCEEDED, [store.RUNNING], fence=new.fence, artifacts=[artifact])
    assert store.list_artifacts(r, keys, job_id) == [artifact]
    assert [e.get("attempt") for e in store.list_events(r, keys, job_id)][-2:] == [new.fence] * 2


def test_late_writes_never_recreate_a_deleted_job(r, keys) -> None:
    job_id = store.create_job(r, keys, "o", base_spec())["id"]
    lease = store.Lease(r, keys, job_id, 30)
    assert lease.acquire()
    r.delete(keys.job(job_id), keys.events(job_id), keys.lease(job_id))
    with pytest.raises(Fenced):
        store.add_event(r, keys, job_id, "info", "late", fence=lease.fence)
    with pytest.raises(Fenced):
        store.update_job(r, keys, job_id, fence=lease.fence, stage="distill")
    assert not r.exists(keys.job(job_id), keys.events(job_id))
    assert not store.Lease(r, keys, job_id, 30).acquire()  # and no new attempt starts on it


def test_reporter_of_a_stale_attempt_stops_the_engine(r, keys) -> None:
    """Every reporter write of the stale attempt raises Fenced, which no `except Exception` in the
    engine can swallow; the current attempt's reporter keeps working."""
    job_id = store.create_job(r, keys, "o", base_spec())["id"]
    old, new = _take_over(r, keys, job_id)
    reporters = {}
    for name, lease in (("old", old), ("new", new)):
        monitor = Monitor(r, keys, job_id, lease, poll_s=60, hard_stop_s=60)  # not started: no renewals
        reporters[name] = RedisReporter(r, keys, job_id, monitor, interval_s=0)
    stale = reporters["old"]
    before = _snapshot(r, keys, job_id)
    with pytest.raises(Fenced):
        stale.event("stage_started", "distill started", stage="distill")
    with pytest.raises(Fenced):
        stale.progress(Progress("distill", 1, 2, 3, 4, 10.0, 1.0, loss=0.5))
    with pytest.raises(Fenced):
        stale.ensure_current()
    assert _snapshot(r, keys, job_id) == before
    assert not issubclass(Fenced, Exception)

    reporters["new"].ensure_current()
    reporters["new"].event("stage_started", "distill started", stage="distill")
    assert store.get_job(r, keys, job_id)["stage"] == "distill"


def test_orphan_sweep_never_marks_a_job_whose_lease_is_held(r, keys) -> None:
    job_id = store.create_job(r, keys, "o", base_spec())["id"]
    store.transition(r, keys, job_id, store.RUNNING, [store.QUEUED])
    lease = store.Lease(r, keys, job_id, 30)
    assert lease.acquire()
    assert not store.claim_orphan(r, keys, job_id, 600, "lost")
    lease.release()
    assert store.claim_orphan(r, keys, job_id, 600, "lost")
    assert not store.claim_orphan(r, keys, job_id, 600, "lost")  # once per grace period
    assert [e["message"] for e in store.list_events(r, keys, job_id)].count("lost") == 1
    assert lease.acquire() and not r.hexists(keys.job(job_id), "requeued_at")  # used up by a start


def test_events_say_which_attempt_wrote_them(r, keys, client) -> None:
    job_id = store.create_job(r, keys, store.owner_of(KEY_A), base_spec())["id"]
    lease = store.Lease(r, keys, job_id, 30)
    assert lease.acquire()
    store.add_event(r, keys, job_id, "info", "from the runner", fence=lease.fence)
    body = client.get(f"/v1/jobs/{job_id}/events").json()
    assert [(e["message"], e["attempt"]) for e in body["data"]] == [
        ("job queued", None),  # written by the API, not by a runner
        ("from the runner", lease.fence),
    ]
