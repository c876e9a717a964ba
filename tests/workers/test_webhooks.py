"""Webhooks end to end through a real `spkd worker` that runs the jobs: a job that succeeds (the
worker's final transition) and a job cancelled while queued behind it (the API's) each reach the
owner's webhook as one signed delivery; a stage subscriber gets one `job.stage_finished` per
stage; a receiver that never answers is given up without touching the jobs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Stack, make_stack, running, small_imagefolder, tiny_spec
from tests.receiver import FAST, HANG, Receiver, finished, register, wait_log

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    st = make_stack(tmp_path_factory.mktemp("whe2e"), redis_url, **FAST)
    small_imagefolder(st.settings.data_root / "hym", per_class=4)
    with running(st):
        st.start_api()
        st.start_worker("w1")
        st.wait_ready()
        yield st


def wait_final(c: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not finished within {timeout} s: {job}")


def test_job_events_reach_webhooks_through_a_real_worker(stack: Stack) -> None:
    with stack.client() as c, Receiver() as rx, Receiver() as stages, Receiver(default=HANG) as hung:
        hook = register(c, rx)
        register(c, stages, events=["job.stage_finished"])
        hung_hook = register(c, hung)

        ran = c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]
        queued = c.post("/v1/jobs", json=tiny_spec({"path": "hym"})).json()["id"]
        # The worker runs one job at a time: the second waits in the queue and is cancelled there.
        assert c.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
        job = wait_final(c, ran, 300)
        assert job["status"] == "succeeded", stack.logs()

        got = rx.wait_for(2, 60)
        assert all(g.verified for g in got)
        by_type = {g.json["type"]: g.json for g in got}
        assert by_type["job.cancelled"]["data"]["id"] == queued
        done = by_type["job.succeeded"]["data"]
        assert done["id"] == ran and done["status"] == "succeeded" and done["error"] is None
        assert done["stage"] == job["stage"]
        assert done["metrics"]["report_acc"]["distilled"] == job["metrics"]["distilled"]["report_acc"]
        assert set(done["metrics"]["timing_s"]) == set(job["metrics"]["timing"])

        log = wait_log(c, hook["id"], finished, 30)
        assert sorted((d["job_id"], d["status"], len(d["attempts"])) for d in log) == sorted(
            [(ran, "delivered", 1), (queued, "delivered", 1)]
        )
        assert len(rx.received) == 2  # one delivery per event, none twice

        events = c.get(f"/v1/jobs/{ran}/events").json()["data"]
        stage_names = [e["data"]["stage"] for e in events if e["kind"] == "stage_finished"]
        assert stage_names
        got_stages = stages.wait_for(len(stage_names), 30)
        assert all(g.verified and g.json["type"] == "job.stage_finished" for g in got_stages)
        assert sorted(g.json["data"]["stage"] for g in got_stages) == sorted(stage_names)
        # each stage's accuracy under its split's name: the chosen epoch's selection accuracy, then
        # evaluate's report accuracy of the shipped student
        results = {g.json["data"]["stage"]: g.json["data"]["stage_result"] for g in got_stages}
        assert results["distill"]["eval_split"] == "selection" and "selection_acc" in results["distill"]
        shipped = job["metrics"][job["metrics"]["shipped"]]["report_acc"]
        assert results["evaluate"]["report_acc"] == shipped and results["evaluate"]["eval_split"] == "report"
        assert not any("val_acc" in r for r in results.values())

        # The receiver that never answers: each event tried FAST["webhook_max_attempts"] times, then
        # given up; both jobs kept their status and the other webhooks were served meanwhile.
        hung_log = wait_log(c, hung_hook["id"], lambda d: len(d) == 2 and finished(d), 60)
        for d in hung_log:
            assert d["status"] == "failed"
            assert [a["error"][:7] for a in d["attempts"]] == ["timeout"] * FAST["webhook_max_attempts"]
        assert c.get(f"/v1/jobs/{ran}").json()["status"] == "succeeded"
        assert c.get(f"/v1/jobs/{queued}").json()["status"] == "cancelled"
