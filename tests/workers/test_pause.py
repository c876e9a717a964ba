"""Pause on the worker's side: the Monitor sees the pause flag (and lets a cancel win), the reporter
counts the training steps a resume will redo, the hard stop ends a stuck paused job `paused`, and
one real job (real uvicorn, a real `spkd worker`, the real Redis, tiny timm models) is paused in
each training stage: it reaches `paused`, its job process exits and the worker runs another job
meanwhile, and after each resume it continues from that stage's epoch-end checkpoint and finally
succeeds with every epoch run exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spkd.cli import procs
from spkd.common.reporter import Progress
from spkd.common.spec import JobSpec
from spkd.core import store
from spkd.core.settings import Settings
from spkd.workers.reporter import Monitor, RedisReporter
from tests.helpers import (
    Stack,
    children_of,
    dump,
    epoch_ends,
    events,
    small_imagefolder,
    tiny_spec,
    wait_event,
    wait_final,
)


def _spec() -> dict:
    return JobSpec.model_validate(
        {
            "teacher": {"model": "test_efficientnet", "weights": "none"},
            "student": {"model": "test_resnet", "weights": "none"},
            "dataset": {"path": "hym"},
        }
    ).model_dump(mode="json")


def _running_job(r, keys) -> tuple[str, store.Lease]:
    job_id = store.create_job(r, keys, "o", _spec())["id"]
    lease = store.Lease(r, keys, job_id, 10)
    assert lease.acquire()
    store.transition(r, keys, job_id, store.RUNNING, [store.QUEUED], fence=lease.fence)
    return job_id, lease


def _until(condition, timeout_s: float = 5.0) -> None:
    procs.wait_until(condition, timeout_s, "the monitor", interval_s=0.02)


def test_monitor_sees_a_pause_and_a_later_cancel_wins(r, keys) -> None:
    job_id, lease = _running_job(r, keys)
    mon = Monitor(r, keys, job_id, lease, poll_s=0.05, hard_stop_s=60)
    mon.start()
    try:
        rep = RedisReporter(r, keys, job_id, mon, interval_s=0.0)
        assert not rep.should_stop()
        store.request_pause(r, keys, job_id)
        _until(rep.should_stop)
        assert mon.pause_seen_at is not None and mon.cancel_seen_at is None
        store.request_cancel(r, keys, job_id)
        _until(lambda: mon.cancel_seen_at is not None)
    finally:
        mon.finish()
        lease.release()


def test_reporter_counts_the_steps_since_the_last_resume_point(r, keys) -> None:
    """What the `paused` event reports as steps_redone: training steps since the last event that
    follows a save (epoch-end checkpoint, finished stage, scored search candidate)."""
    job_id, lease = _running_job(r, keys)
    mon = Monitor(r, keys, job_id, lease, poll_s=60, hard_stop_s=60)  # not started: counts only
    rep = RedisReporter(r, keys, job_id, mon, interval_s=0.0)
    steps = 0
    for saved in ("checkpoint", "stage_finished", "search"):
        for step in range(1, 6):
            rep.progress(Progress("distill", 1, 2, step, 5, 10.0, None))
            steps += 1
        assert mon.steps_since_save == 5
        rep.event("epoch_end", "an epoch ended (not saved yet)", stage="distill", epoch=1)
        assert mon.steps_since_save == 5
        rep.event(saved, f"{saved}: saved", stage="distill", epoch=1)
        assert mon.steps_since_save == 0, saved
    rep.progress(Progress("distill", 2, 2, 1, 5, 10.0, None))
    assert mon.steps_since_save == 1
    lease.release()


_STUCK_WORKER = """
import time
from spkd.core import store
r = store.connect({url!r}); keys = store.Keys({prefix!r})
lease = store.Lease(r, keys, {job!r}, 10); assert lease.acquire()
from spkd.workers.reporter import Monitor
Monitor(r, keys, {job!r}, lease, poll_s=0.05, hard_stop_s=0.5).start()
print('ready', flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("then_cancel", [False, True], ids=["pause", "pause-then-cancel"])
def test_hard_stop_after_a_pause(r, keys, settings: Settings, then_cancel: bool) -> None:
    """The engine never asks should_stop() (stuck in one long call): hard_stop_s after the pause the
    monitor ends the job `paused` (or `cancelled`, when a cancel came too) and exits the process."""
    job_id = store.create_job(r, keys, "o", _spec())["id"]
    store.transition(r, keys, job_id, store.RUNNING, [store.QUEUED])
    code = _STUCK_WORKER.format(url=settings.redis_url, prefix=settings.redis_prefix, job=job_id)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        store.request_pause(r, keys, job_id)
        if then_cancel:
            store.request_cancel(r, keys, job_id)
        assert proc.wait(timeout=20) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
    job = store.get_job(r, keys, job_id)
    last = store.list_events(r, keys, job_id)[-1]
    assert job["status"] == ("cancelled" if then_cancel else "paused"), job
    assert "hard stop" in last["message"], last
    if not then_cancel:  # no training step ran in this process: nothing to redo
        assert last["data"]["steps_redone"] == 0, last
    assert not store.lease_held(r, keys, job_id)


# ---------------------------------------------------------------- a real job, paused three times

STAGES = ("teacher_finetune", "baseline", "distill")
EPOCHS = 4


def _checkpoint(stage: str, epoch: int):
    return lambda e: e["kind"] == "checkpoint" and e["data"] == {"stage": stage, "epoch": epoch}


def _status(status: str):
    return lambda e: e["kind"] == "status" and e["data"].get("status") == status


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_mid_epoch(r, keys, job_id: str, stage: str, timeout_s: float = 120) -> None:
    """Until the job's progress is in `stage`, past its first epoch-end checkpoint and a few steps
    into an epoch: a pause then has steps of that epoch to redo."""

    def there() -> bool:
        p = store.get_job(r, keys, job_id)["progress"] or {}
        return p.get("stage") == stage and p.get("epoch", 0) >= 2 and p.get("step", 0) >= 3

    procs.wait_until(there, timeout_s, f"{job_id} a few steps into {stage} epoch 2", interval_s=0.01)


def _resume(c, job_id: str, timeout_s: float = 30) -> dict:
    """POST resume; its run may still be letting go of the lease for a moment (409 `shutting down`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = c.post(f"/v1/jobs/{job_id}/resume")
        if resp.status_code != 409 or "shutting down" not in resp.text or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            return resp.json()
        time.sleep(0.2)


@pytest.mark.slow
def test_pause_in_each_training_stage_then_resume(stack_factory, redis_url: str) -> None:
    st: Stack = stack_factory(redis_url, cancel_poll_s=0.02)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=8)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    worker = st.start_worker("w1")
    st.wait_ready()
    spec = tiny_spec(
        {"path": "hym"},
        teacher={"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": EPOCHS}},
        train={"epochs": EPOCHS, "batch_size": 2, "image_size": 32, "num_workers": 0},
        baseline=True,
    )
    other_spec = tiny_spec({"path": "hym"}, train={"epochs": 1, "batch_size": 4, "image_size": 32})
    t0 = time.monotonic()
    with st.client() as c:
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        after, redone = "0-0", []
        for stage in STAGES:
            wait_event(r, keys, job_id, _checkpoint(stage, 1), 300, after)
            runner = children_of(worker.pid)  # the job's process (the pool's one child)
            assert len(runner) == 1, runner
            _wait_mid_epoch(r, keys, job_id, stage)
            # Frozen while the pause is asked for, so the stop lands in this stage (its steps are
            # milliseconds long, the monitor polls every 20 ms).
            _signal(runner, signal.SIGSTOP)
            try:
                resp = c.post(f"/v1/jobs/{job_id}/pause")
            finally:
                _signal(runner, signal.SIGCONT)
            assert resp.status_code == 200 and resp.json()["pause_requested"], resp.text

            paused = wait_event(r, keys, job_id, _status("paused"), 120, after)
            evs = events(r, keys, job_id)
            stopped = re.fullmatch(rf"stopped in {stage} epoch (\d+) step (\d+)", paused["data"]["stopped"])
            assert stopped, dump(evs)
            epoch, step = int(stopped[1]), int(stopped[2])
            assert epoch >= 2, paused  # after the first epoch-end checkpoint of this stage
            # Honest: the steps of the interrupted epoch run before the stop, no more, no fewer.
            assert paused["data"]["steps_redone"] == step - 1, paused
            redone.append(step - 1)
            redo = f"redoes the {step - 1} training step" if step > 1 else "has nothing to redo"
            assert paused["message"].startswith(f"paused (stopped in {stage} epoch {epoch} step {step})")
            assert redo in paused["message"], paused
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "paused" and not job["pause_requested"] and job["stage"] == stage, job

            # The device is free: the job's process exits, the lease goes, and the worker runs
            # another job to the end while this one stays paused.
            gone = lambda pids=tuple(runner): not any(map(_alive, pids))  # noqa: E731
            procs.wait_until(gone, 60, "the paused job's process to exit")
            procs.wait_until(lambda: not store.lease_held(r, keys, job_id), 30, "the lease release")
            other = c.post("/v1/jobs", json=other_spec).json()["id"]
            done = wait_final(r, keys, other, 300)
            assert done["status"] == "succeeded", dump(events(r, keys, other)) + st.logs()
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "paused"

            # Resumed: a new attempt from this stage's last epoch-end checkpoint.
            assert _resume(c, job_id)["status"] == "queued"
            resumed = wait_event(
                r, keys, job_id, lambda e: "resuming from checkpoint" in e["message"], 120, paused["id"]
            )
            assert f"({stage} epoch {epoch - 1})" in resumed["message"], resumed
            after = resumed["id"]

        job = wait_final(r, keys, job_id, 300)
        evs = events(r, keys, job_id)
        print(f"3 pauses (steps redone: {redone}), succeeded after {time.monotonic() - t0:.1f} s")
        assert any(redone), "no pause landed mid-epoch: the step count was never exercised"
        assert job["status"] == "succeeded", dump(evs) + st.logs()
        # Every epoch of every stage ended exactly once: each resume went on, none started over.
        assert epoch_ends(evs) == [(s, e) for s in STAGES for e in range(1, EPOCHS + 1)], dump(evs)
        starts = [e for e in evs if e["kind"] == "status" and e["data"]["status"] == "validating"]
        assert len(starts) == 4, dump(evs)
        assert not any("worker was lost" in e["message"] for e in evs), dump(evs)
        assert {"student/model.safetensors", "metrics.json"} <= {
            a["name"] for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        }
