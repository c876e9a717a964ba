"""The store's invariants and the worker's decisions, in-process against the real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spkd.common.errors import SpkdError
from spkd.common.reporter import Progress
from spkd.common.spec import JobSpec
from spkd.core import attempts, blobs, bucket, references, store
from spkd.core.settings import Settings
from spkd.workers import runner
from spkd.workers.reporter import Monitor, RedisReporter
from tests.helpers import pin_teacher_size


def base_spec(**over: object) -> dict:
    s = {
        "teacher": {"model": "test_efficientnet", "weights": "none"},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": {"path": "hym"},
    }
    s.update(over)
    return JobSpec.model_validate(pin_teacher_size(s)).model_dump(mode="json")


def test_ids_sort_by_creation() -> None:
    ids = []
    for _ in range(3):
        ids.append(store.new_id("job"))
        time.sleep(0.002)
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_transitions_are_guarded_and_indexed(r, keys) -> None:
    job = store.create_job(r, keys, "o1", base_spec())
    jid = job["id"]
    store.transition(r, keys, jid, store.VALIDATING, [store.QUEUED])
    with pytest.raises(store.Conflict):
        store.transition(r, keys, jid, store.RUNNING, [store.QUEUED])
    store.transition(r, keys, jid, store.CANCELLED, store.ACTIVE)
    assert r.zrange(keys.jobs("o1", store.CANCELLED), 0, -1) == [jid]
    assert r.zcard(keys.jobs("o1", store.QUEUED)) == 0 and r.zcard(keys.status(store.VALIDATING)) == 0
    final = store.get_job(r, keys, jid)
    assert final["finished_at"] >= final["started_at"] >= final["created_at"]
    assert store.get_job(r, keys, jid, owner="someone-else") is None


def test_only_one_lease_holder_under_contention(r, keys) -> None:
    jid = store.create_job(r, keys, "o", base_spec())["id"]  # a lease is only taken on a job
    leases = [store.Lease(r, keys, jid, ttl_s=5) for _ in range(8)]
    won: list[int] = []
    barrier = threading.Barrier(len(leases))

    def grab(i: int) -> None:
        barrier.wait()
        if leases[i].acquire():
            won.append(i)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    holder, other = leases[won[0]], leases[(won[0] + 1) % len(leases)]
    assert holder.renew() and not other.renew()
    other.release()  # not the holder: no effect
    assert store.lease_held(r, keys, jid)
    holder.release()
    assert not store.lease_held(r, keys, jid)


def test_idempotency_claim_is_atomic(r, keys) -> None:
    results = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        barrier.wait()
        results.append(store.claim_idempotency_key(r, keys, "o", "k", "body", f"job_{i}", 60))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(None) == 1
    winners = {x["job_id"] for x in results if x}
    assert len(winners) == 1


def test_cancelled_queued_job_never_starts(r, keys, settings: Settings) -> None:
    jid = store.create_job(r, keys, "o", base_spec())["id"]
    store.request_cancel(r, keys, jid)
    assert runner.execute_job(r, keys, settings, jid, "w") == "skipped"
    assert [e["data"]["status"] for e in store.list_events(r, keys, jid)] == ["queued", "cancelled"]
    assert store.get_job(r, keys, jid)["attempts"] == 0


def test_job_held_by_another_worker_is_not_run_twice(r, keys, settings: Settings) -> None:
    jid = store.create_job(r, keys, "o", base_spec())["id"]
    other = store.Lease(r, keys, jid, 10)
    assert other.acquire()
    assert runner.execute_job(r, keys, settings, jid, "w2") == "busy"
    assert store.get_job(r, keys, jid)["status"] == store.QUEUED
    other.release()


def test_worker_fails_with_field_on_bad_dataset(r, keys, settings: Settings) -> None:
    jid = store.create_job(r, keys, "o", base_spec(dataset={"path": "missing"}))["id"]
    assert runner.execute_job(r, keys, settings, jid, "w") == "failed"
    job = store.get_job(r, keys, jid)
    assert job["error"]["code"] == "dataset_not_found" and job["error"]["field"] == "dataset.path"
    assert not store.lease_held(r, keys, jid)  # released after the run


def test_too_many_attempts_fails_the_job(r, keys, settings: Settings) -> None:
    jid = store.create_job(r, keys, "o", base_spec())["id"]
    store.transition(r, keys, jid, store.RUNNING, [store.QUEUED])
    r.hset(keys.job(jid), "attempts", settings.max_attempts)  # it died that often already
    assert runner.execute_job(r, keys, settings, jid, "w") == "failed"
    assert store.get_job(r, keys, jid)["error"]["code"] == "worker_lost"


@pytest.mark.parametrize(
    ("name", "sidecar"),
    [("teacher/model.safetensors", "teacher/config.json"), ("teacher.safetensors", "teacher.json")],
    ids=["hub folder", "old flat layout"],
)
def test_job_weights_come_from_the_bucket_with_the_json_naming_their_classes(
    settings: Settings, tmp_path: Path, name: str, sidecar: str
) -> None:
    """`weights: job:<id>` on a host that never had that job's files (a bucket, core/bucket.py):
    the weights the resolver named are fetched into the attempt folder, with the JSON beside them
    that the reused-head class check reads; a job's hub folder and the old flat layout alike."""
    remote = blobs.LocalBlobs(tmp_path / "bucket")
    job_id, output = "job_01earlierjobbbbbbbbbb", attempts.name(1)
    for artifact, data in ((name, b"weights"), (sidecar, b'{"label_names": ["a"], "class_names": ["a"]}')):
        src = tmp_path / "made" / artifact
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        remote.put_file(bucket.artifact_key(job_id, artifact, output), src)
    here = references.artifact_dir(settings) / job_id / output
    spec = JobSpec.model_validate(base_spec(teacher={"model": "test_vit", "weights": str(here / name)}))
    runner._fetch_job_weights(remote, settings, spec)
    assert (here / name).read_bytes() == b"weights"
    assert (here / sidecar).read_bytes().startswith(b'{"label_names"')


def test_resolve_job_weights(r, keys, settings: Settings) -> None:
    earlier = store.create_job(r, keys, "o", base_spec(teacher={"model": "test_vit", "weights": "none"}))[
        "id"
    ]
    spec = JobSpec.model_validate(base_spec(teacher={"model": "test_vit", "weights": f"job:{earlier}"}))
    with pytest.raises(SpkdError) as e:
        references.resolve_weights(r, keys, settings, spec, "o")
    assert e.value.code == "weights_job_not_finished" and e.value.field == "teacher.weights"
    store.transition(r, keys, earlier, store.SUCCEEDED, [store.QUEUED])
    out = Path(settings.artifact_root).resolve() / earlier
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "model.safetensors").write_bytes(b"w")
    resolved = references.resolve_weights(r, keys, settings, spec, "o")
    assert resolved.teacher.weights == str(out / "teacher" / "model.safetensors")
    with pytest.raises(SpkdError) as e:
        references.resolve_weights(r, keys, settings, spec, "another-owner")
    assert e.value.code == "weights_job_not_found"
    wrong = JobSpec.model_validate(base_spec(student={"model": "test_convnext", "weights": f"job:{earlier}"}))
    with pytest.raises(SpkdError) as e:
        references.resolve_weights(r, keys, settings, wrong, "o")
    assert e.value.code == "weights_mismatch" and e.value.field == "student.weights"
    outside = JobSpec.model_validate(base_spec(student={"model": "test_resnet", "weights": "../../x.pth"}))
    with pytest.raises(SpkdError) as e:
        references.resolve_weights(r, keys, settings, outside, "o")
    assert e.value.code == "weights_not_allowed"


def test_reporter_throttles_progress_and_sees_cancel(r, keys, settings: Settings) -> None:
    jid = store.create_job(r, keys, "o", base_spec())["id"]
    lease = store.Lease(r, keys, jid, 5)
    assert lease.acquire()
    mon = Monitor(r, keys, jid, lease, poll_s=0.05, hard_stop_s=60)
    mon.start()
    rep = RedisReporter(r, keys, jid, mon, interval_s=0.5)
    rep.event("stage_started", "distill", stage="distill")
    for step in range(1, 201):
        rep.progress(Progress("distill", 1, 1, step, 400, 100.0, 3.0))
    progress = store.get_job(r, keys, jid)["progress"]
    assert progress["step"] < 200  # throttled: not every step was written
    assert store.get_job(r, keys, jid)["stage"] == "distill"
    assert not rep.should_stop()
    store.request_cancel(r, keys, jid)  # queued -> cancelled, and the flag is set
    deadline = time.monotonic() + 2
    while not rep.should_stop():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    mon.finish()
    lease.release()


def test_lease_of_a_dead_local_process_is_taken_over(r, keys) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for jid in ("job_y", "job_z", "job_w"):
        store.create_job(r, keys, "o", base_spec(), job_id=jid)
    r.set(keys.lease("job_y"), f"{socket.gethostname()}:{dead.pid}:abc", px=60_000)
    live = store.Lease(r, keys, "job_y", 5)
    r.set(keys.lease("job_z"), f"{socket.gethostname()}:{os.getpid()}:abc", px=60_000)  # alive: keep out
    assert not store.Lease(r, keys, "job_z", 5).take_over_dead_local_holder()
    r.set(keys.lease("job_w"), f"other-host:{dead.pid}:abc", px=60_000)  # cannot tell: wait for the TTL
    assert not store.Lease(r, keys, "job_w", 5).take_over_dead_local_holder()
    assert not live.acquire() and live.take_over_dead_local_holder()
    assert live.holder() == live.token


def test_hard_stop_kills_a_stuck_job_process(r, keys, settings: Settings) -> None:
    """The engine never asks should_stop() (stuck in one long call): the monitor ends the job as
    cancelled and exits the process after hard_stop_s."""
    jid = store.create_job(r, keys, "o", base_spec())["id"]
    store.transition(r, keys, jid, store.RUNNING, [store.QUEUED])
    code = (
        "import time\n"
        "from spkd.core import store\n"
        f"r = store.connect({settings.redis_url!r}); keys = store.Keys({settings.redis_prefix!r})\n"
        f"lease = store.Lease(r, keys, {jid!r}, 10); assert lease.acquire()\n"
        "from spkd.workers.reporter import Monitor\n"
        f"Monitor(r, keys, {jid!r}, lease, poll_s=0.05, hard_stop_s=0.5).start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        store.request_cancel(r, keys, jid)
        assert proc.wait(timeout=20) == 75
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    job = store.get_job(r, keys, jid)
    assert job["status"] == store.CANCELLED and "hard stop" in store.list_events(r, keys, jid)[-1]["message"]
    assert not store.lease_held(r, keys, jid)
