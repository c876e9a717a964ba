"""One runner per job, enforced at every write: a job process frozen (SIGSTOP) past its lease while
a second worker takes the job over, then thawed (SIGCONT), writes nothing more.

One job goes through every freeze point in turn (a job per point would cost a minute each on a
small CPU box), alternating between two real `spkd worker` processes: mid-step in each training
stage, at an epoch end, in evaluate and in export. While the stale process is thawed, the attempt
that took over is frozen (or already finished), so every change in that window is the stale
process's: there must be none, in Redis (job record, events, artifact registry) or on disk.

Real `spkd worker` processes (Celery prefork), the real Redis, tiny timm models.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from spkd.core import attempts, store
from spkd.core.queue import enqueue, make_celery
from tests.helpers import (
    SeaweedS3,
    Stack,
    children_of,
    dump,
    events,
    small_imagefolder,
    tiny_spec,
    wait_event,
    wait_final,
)

pytestmark = pytest.mark.slow

EPOCHS = 2
STAGES = ["teacher_finetune", "baseline", "distill", "evaluate", "export"]


def _job_process(st: Stack, worker: str) -> int:
    kids = children_of(st.workers[worker].pid)
    assert len(kids) == 1, f"worker {worker} has pool processes {kids}"
    return kids[0]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _files(out: Path, skip: Path | None) -> dict[str, tuple[int, int]]:
    found = {}
    for p in out.rglob("*"):
        if p.is_file() and (skip is None or not p.is_relative_to(skip)):
            st = p.stat()
            found[p.relative_to(out).as_posix()] = (st.st_size, st.st_mtime_ns)
    return found


def _objects(bucket: tuple[SeaweedS3, str] | None, job_id: str, stale: str | None) -> dict[str, tuple]:
    """The job's objects in the bucket (size, ETag, time), but the stale attempt's own prefixes."""
    if bucket is None:
        return {}
    server, prefix = bucket
    found, token = {}, {}
    own = [f"/checkpoints/{stale}/", f"/{stale}/"] if stale else []
    while True:
        where = {"Bucket": server.BUCKET, "Prefix": f"{prefix}/jobs/{job_id}/"}
        page = server.client().list_objects_v2(**where, **token)
        for o in page.get("Contents", []):
            if not any(p in o["Key"] for p in own):
                found[o["Key"]] = (o["Size"], o["ETag"], o["LastModified"])
        if not page.get("IsTruncated"):
            return found
        token = {"ContinuationToken": page["NextContinuationToken"]}


def _wait_cleaned_up(out: Path, job: dict, bucket, job_id: str, timeout: float) -> None:
    """The attempt that succeeded removes the other attempts' folders, its own checkpoints and the
    published checkpoints right after its final status: wait for that, so the snapshots that follow
    see only what the stale attempt does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        local_done = {p.name for p in out.iterdir()} == {job["output"]}
        remote_done = bucket is None or not bucket[0].keys(f"{bucket[1]}/jobs/{job_id}/checkpoints/")
        if local_done and remote_done:
            return
        time.sleep(0.1)
    left = sorted(out.iterdir())
    raise AssertionError(f"the succeeded attempt did not clean up within {timeout} s: {left}")


def _snapshot(r, keys, job_id: str, out: Path, stale: str | None, bucket) -> dict:
    return {
        "job": r.hgetall(keys.job(job_id)),
        "events": r.xlen(keys.events(job_id)),
        "artifacts": r.hgetall(keys.artifacts(job_id)),
        "files": _files(out, out / stale if stale else None),
        "objects": _objects(bucket, job_id, stale),
    }


def _diff(before: dict, after: dict, evs_after: list[dict]) -> list[str]:
    """What changed between two snapshots, in words (empty: nothing)."""
    changes = []
    fields = sorted(
        k for k in set(before["job"]) | set(after["job"]) if before["job"].get(k) != after["job"].get(k)
    )
    if fields:
        changes.append("job fields " + ",".join(fields))
    if after["events"] != before["events"]:
        kinds = [
            e["kind"] + (f"({e['data'].get('status')})" if e["kind"] == "status" else "") for e in evs_after
        ]
        changes.append(f"{after['events'] - before['events']} events " + ",".join(kinds))
    if after["artifacts"] != before["artifacts"]:
        changes.append("artifact registry")
    files = sorted(
        k
        for k in set(before["files"]) | set(after["files"])
        if before["files"].get(k) != after["files"].get(k)
    )
    if files:
        changes.append("files " + ",".join(files))
    objects = sorted(
        k
        for k in set(before["objects"]) | set(after["objects"])
        if before["objects"].get(k) != after["objects"].get(k)
    )
    if objects:
        changes.append("objects " + ",".join(objects))
    return changes


def _row(row: tuple) -> str:
    name, landed, stale, taker, wrote, exited = row
    return f"| {name} | {landed} | {stale} | {taker} | {'; '.join(wrote) or 'nothing'} | {exited} |"


def _wait_progress_in(r, keys, job_id: str, stage: str, timeout: float) -> None:
    """Until the runner reports a training step of `stage` (or has already gone past it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get_job(r, keys, job_id)
        p = job["progress"] or {}
        if p.get("stage") == stage and p.get("step", 0) >= 1:
            return
        if job.get("stage") in STAGES and STAGES.index(job["stage"]) > STAGES.index(stage):
            return
        assert job["status"] not in store.FINAL, job
        time.sleep(0.02)
    raise AssertionError(f"no progress in {stage} within {timeout} s")


def _where(r, keys, job_id: str) -> str:
    job = store.get_job(r, keys, job_id)
    last = events(r, keys, job_id)[-1]
    p = job["progress"] or {}
    step = f"{p.get('stage')} e{p.get('epoch')} s{p.get('step')}/{p.get('steps')}" if p else "-"
    return f"stage {job.get('stage')}, progress {step}, last event {last['kind']} {last['message'][:40]!r}"


@pytest.mark.parametrize("storage", ["folders", "bucket"])
def test_frozen_runner_is_fenced_at_every_point(stack_factory, redis_url: str, request, storage: str) -> None:
    """`folders`: the workers share the artifact folder. `bucket`: checkpoints and artifacts also go
    to a real S3 server (SPKD_STORAGE_URL), where a stale attempt could overwrite objects."""
    bucket, over = None, {}
    if storage == "bucket":
        server: SeaweedS3 = request.getfixturevalue("s3_server")
        prefix = f"freeze-{uuid.uuid4().hex[:8]}"
        bucket, over = (server, prefix), server.settings(prefix)
    st: Stack = stack_factory(redis_url, lease_ttl_s=3.0, max_attempts=20, **over)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=8)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_worker("w1")
    st.start_worker("w2")
    deadline = time.monotonic() + 120
    while len(store.live_workers(r, keys, st.settings.heartbeat_ttl_s)) < 2:
        assert time.monotonic() < deadline, st.logs()
        time.sleep(0.2)
    spec = tiny_spec(
        {"path": "hym"},
        teacher={"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": EPOCHS}},
        train={"epochs": EPOCHS, "batch_size": 4, "image_size": 32, "num_workers": 0},
        baseline=True,
    )
    job_id = store.create_job(r, keys, store.owner_of("test"), spec)["id"]
    out = Path(st.settings.artifact_root).resolve() / job_id
    enqueue(make_celery(st.settings), st.settings, job_id)
    t0 = time.monotonic()

    def at_event(kind: str, stage: str | None = None):
        def wait(cursor: str) -> None:
            match = lambda e: e["kind"] == kind and (stage is None or e["data"].get("stage") == stage)  # noqa: E731
            wait_event(r, keys, job_id, match, 150, cursor)

        return wait

    def mid_step(stage: str):
        return lambda cursor: _wait_progress_in(r, keys, job_id, stage, 150)

    points = [
        ("teacher_finetune mid-step", mid_step("teacher_finetune")),
        ("epoch end", at_event("epoch_end")),
        ("baseline mid-step", mid_step("baseline")),
        ("distill mid-step", mid_step("distill")),
        ("evaluate", at_event("stage_started", "evaluate")),
        ("export", at_event("stage_started", "export")),
    ]
    table, cursor, frozen = [], "0-0", set()
    try:
        for name, reach in points:
            reach(cursor)
            job = store.get_job(r, keys, job_id)
            stale, tries = job["worker"], job["attempts"]
            stale_pid = _job_process(st, stale)
            os.kill(stale_pid, signal.SIGSTOP)
            frozen.add(stale_pid)
            landed = _where(r, keys, job_id)
            stale_fence = store.get_job(r, keys, job_id).get("fence")
            cursor = events(r, keys, job_id)[-1]["id"]

            # The lease lapses, the orphan sweep requeues the job, the other worker resumes it.
            new_pid = None
            if name == "export":
                job = wait_final(r, keys, job_id, 300)
                assert job["status"] == "succeeded", dump(events(r, keys, job_id)) + st.logs()
                _wait_cleaned_up(out, job, bucket, job_id, 60)
            else:
                ev = wait_event(r, keys, job_id, lambda e: e["kind"] == "dataset", 150, cursor)
                job = store.get_job(r, keys, job_id)
                assert job["attempts"] > tries and job["worker"] != stale, (job, ev)
                new_pid = _job_process(st, job["worker"])
                os.kill(new_pid, signal.SIGSTOP)  # from now on only the stale process can write
                frozen.add(new_pid)
            taker, new_fence = job["worker"], job.get("fence")

            # The stale attempt's own folder and prefixes (core/attempts.py) are where its late
            # writes may land: never a name another attempt reads, never named by the job record.
            own = attempts.name(int(stale_fence)) if stale_fence else None
            before = _snapshot(r, keys, job_id, out, own, bucket)
            os.kill(stale_pid, signal.SIGCONT)
            exited = _wait_gone(stale_pid, 60)
            after = _snapshot(r, keys, job_id, out, own, bucket)
            stale_events = store.list_events(
                r, keys, job_id, after=events(r, keys, job_id)[before["events"] - 1]["id"]
            )
            wrote = _diff(before, after, stale_events)
            if new_pid is not None:
                os.kill(new_pid, signal.SIGCONT)
            table.append((name, landed, f"{stale}#{stale_fence}", f"{taker}#{new_fence}", wrote, exited))
            print(_row(table[-1]), flush=True)
            assert not wrote, f"{name}: the stale attempt wrote {wrote}\n{dump(events(r, keys, job_id))}"
            assert exited, f"{name}: the stale job process did not stop"
            cursor = events(r, keys, job_id)[-1]["id"]
    finally:  # never leave a stopped process behind, whatever failed
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    job = store.get_job(r, keys, job_id)
    evs = events(r, keys, job_id)
    print(f"\n{len(points)} freeze/thaw points in {time.monotonic() - t0:.0f} s, attempts={job['attempts']}")
    print("| point | frozen at | stale attempt | took over | stale wrote after thaw | stale exited |")
    print("\n".join(_row(row) for row in table))

    # Events: no attempt writes after a newer one started, no epoch twice within an attempt, every
    # checkpoint once, and the job succeeded exactly once.
    tags = [e["attempt"] for e in evs if "attempt" in e]
    assert tags == sorted(tags), dump(evs)
    per_attempt = [
        (e["attempt"], e["data"]["stage"], e["data"]["epoch"]) for e in evs if e["kind"] == "epoch_end"
    ]
    assert len(per_attempt) == len(set(per_attempt)), dump(evs)
    ckpts = [(e["data"]["stage"], e["data"]["epoch"]) for e in evs if e["kind"] == "checkpoint"]
    assert len(ckpts) == len(set(ckpts)), dump(evs)
    assert [e["data"]["status"] for e in evs if e["kind"] == "status"].count("succeeded") == 1
    assert job["status"] == "succeeded"
    curves = job["metrics"]["curves"]
    assert {s: len(curves[s]) for s in ("teacher_finetune", "baseline", "distill")} == dict.fromkeys(
        ("teacher_finetune", "baseline", "distill"), EPOCHS
    )
    # The record names the last attempt's folder; besides it only folders of stale attempts may be
    # left (one thawed after the success removed the others: the sweep takes it later). Every
    # registered artifact is its file on disk.
    assert job["output"] == attempts.name(int(job["fence"])), job
    stale_folders = {attempts.name(int(row[2].split("#")[1])) for row in table}
    left = {p.name for p in out.iterdir()}
    assert job["output"] in left and left - {job["output"]} <= stale_folders, left
    arts = store.list_artifacts(r, keys, job_id)
    assert {a["name"] for a in arts} >= {"student/model.safetensors", "student.onnx", "metrics.json"}
    for a in arts:
        data = (out / job["output"] / a["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == a["sha256"] and len(data) == a["size"], a["name"]
        if bucket is not None:  # and the object under the record's attempt prefix
            server, prefix = bucket
            key = f"{prefix}/jobs/{job_id}/{job['output']}/artifacts/{a['name']}"
            head = server.client().head_object(Bucket=server.BUCKET, Key=key)
            assert head["Metadata"]["sha256"] == a["sha256"], key
    logs = "".join(p.read_text() for p in st.log_dir.glob("*.log"))
    assert logs.count("fenced off") + logs.count("execution lease lost") >= len(points), st.logs()
