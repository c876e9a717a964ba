"""Cancel means cancelled: a 200 to POST .../cancel is always followed by the
status `cancelled` (no results registered), and a job that finished first answers 409 with its
status. The store's invariant under a real race (threads, real Redis), then a real worker frozen
(SIGSTOP) after its last training step, in evaluate and in export, while the cancel comes in."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from spkd.core import store
from tests.helpers import (
    KEY_A,
    Stack,
    children_of,
    dump,
    events,
    small_imagefolder,
    tiny_spec,
    wait_event,
    wait_final,
)


def _race_once(r, keys, finish_to: str) -> tuple[str, str]:
    """A running job; one thread cancels while another ends it. Returns (cancel outcome, final)."""
    jid = store.create_job(r, keys, "o", {"x": 1})["id"]
    store.transition(r, keys, jid, store.RUNNING, [store.QUEUED])
    barrier, outcome = threading.Barrier(2), {}

    def cancel() -> None:
        barrier.wait()
        try:
            store.request_cancel(r, keys, jid)
            outcome["cancel"] = "accepted"
        except store.Conflict:
            outcome["cancel"] = "conflict"

    def finish() -> None:
        barrier.wait()
        try:
            store.transition(r, keys, jid, finish_to, [store.RUNNING], artifacts=[{"name": "a", "size": 1}])
        except store.CancelPending:  # what the runner does then
            store.transition(r, keys, jid, store.CANCELLED, [store.RUNNING])

    threads = [threading.Thread(target=cancel), threading.Thread(target=finish)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job = store.get_job(r, keys, jid)
    if job["status"] == store.CANCELLED:
        assert store.list_artifacts(r, keys, jid) == []  # never registered
    return outcome["cancel"], job["status"]


@pytest.mark.parametrize("finish_to", [store.SUCCEEDED, store.FAILED])
def test_accepted_cancel_always_ends_cancelled_under_a_race(r, keys, finish_to: str) -> None:
    seen = {_race_once(r, keys, finish_to) for _ in range(150)}
    print(sorted(seen))
    assert seen <= {("accepted", store.CANCELLED), ("conflict", finish_to)}, seen


def _stop(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_cancel_after_the_last_training_step(stack_factory, redis_url: str, stage: str) -> None:
    """Freeze the job process as `stage` starts, cancel, thaw: 200 then cancelled, no artifacts.
    If the job won the race and finished first (possible, the stages are short), the cancel must
    be a 409 naming that status; then the test tries again with a new job."""
    st: Stack = stack_factory(redis_url)
    small_imagefolder(Path(st.settings.data_root) / "hym", per_class=4)
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    st.start_api()
    st.start_worker("w1")
    st.wait_ready()
    with st.client(KEY_A) as c:
        for _ in range(4):
            jid = c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]
            wait_event(
                r, keys, jid, lambda e: e["kind"] == "stage_started" and e["data"].get("stage") == stage, 300
            )
            pids = children_of(st.workers["w1"].pid)
            _stop(pids, signal.SIGSTOP)
            try:
                resp = c.post(f"/v1/jobs/{jid}/cancel")
            finally:
                _stop(pids, signal.SIGCONT)
            job = wait_final(r, keys, jid, 120)
            if resp.status_code == 409:  # it finished before the freeze: a consistent answer
                assert resp.json()["error"]["status"] == job["status"] == "succeeded", resp.text
                continue
            assert resp.status_code == 200 and resp.json()["status"] == "running", resp.text
            assert job["status"] == "cancelled", (job, dump(events(r, keys, jid)), st.logs())
            assert c.get(f"/v1/jobs/{jid}").json()["status"] == "cancelled"
            assert c.get(f"/v1/jobs/{jid}/artifacts").json()["data"] == []
            for name in ("student/model.safetensors", "student.onnx", "metrics.json"):
                assert c.get(f"/v1/jobs/{jid}/artifacts/{name}").status_code == 404
            assert c.post(f"/v1/jobs/{jid}/cancel").status_code == 200  # idempotent, still cancelled
            return
    pytest.fail("the job finished before every freeze; the cancel path was never exercised")
