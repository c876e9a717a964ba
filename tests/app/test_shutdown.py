"""The API's lifespan ends: stopping the live-event reader (app/live.py) never hangs, even when the
stop lands while the reader awaits Redis (a cancel swallowed there used to leave it looping)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from spkd.app.main import create_app
from spkd.cli.server import SERVE_GRACE_S
from spkd.core import store
from tests.helpers import KEY_A, Stack, make_settings


def test_start_and_stop_the_api_forty_times_without_a_hang(tmp_path: Path, redis_url: str) -> None:
    done: list[int] = []

    def cycles() -> None:
        for i in range(40):
            s = make_settings(tmp_path / str(i), redis_url)
            try:
                with TestClient(create_app(s)) as c:
                    assert c.get("/healthz").status_code == 200
            finally:
                store.delete_prefix(store.connect(redis_url), s.redis_prefix)
            done.append(i)

    worker = threading.Thread(target=cycles, daemon=True)
    worker.start()
    worker.join(240)
    assert not worker.is_alive(), f"the API's shutdown hung after {len(done)} clean start/stop cycles"
    assert len(done) == 40


def test_sigterm_with_open_event_streams_exits_within_the_grace(stack_factory, redis_url: str) -> None:
    """`spkd serve` told to stop (SIGTERM, as `docker compose stop` does) while clients follow live
    events: uvicorn's graceful shutdown waits for open connections, and an SSE stream never ends by
    itself, so without a bound the process waited for the clients (forever, or until compose's
    SIGKILL). The streams are cut after the grace and the process exits."""
    st: Stack = stack_factory(redis_url)
    st.start_api()
    st.wait_api()
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    job_id = store.create_job(
        r,
        keys,
        store.owner_of(KEY_A),
        {"teacher": {"model": "test_resnet"}, "student": {"model": "test_resnet"}, "dataset": {"path": "x"}},
    )["id"]
    opened = threading.Barrier(4)
    ended: list[str] = []

    def follow() -> None:
        with st.client(timeout=120) as c, c.stream("GET", f"/v1/jobs/{job_id}/events?stream=true") as resp:
            assert resp.status_code == 200
            opened.wait(30)
            try:
                for _ in resp.iter_bytes():
                    pass
                ended.append("closed")
            except httpx.RemoteProtocolError:  # cut mid-stream: the client reconnects with Last-Event-ID
                ended.append("cut")

    followers = [threading.Thread(target=follow, daemon=True) for _ in range(3)]
    for t in followers:
        t.start()
    opened.wait(30)
    assert st.api is not None
    st.api.popen.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        st.api.popen.wait(SERVE_GRACE_S + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"spkd serve still running {SERVE_GRACE_S + 10} s after SIGTERM\n{st.logs()}")
    took = time.monotonic() - t0
    for t in followers:
        t.join(10)
    assert len(ended) == 3, (ended, st.logs())
    print(f"spkd serve exited {took:.1f} s after SIGTERM with 3 open event streams")
