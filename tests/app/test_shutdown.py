"""The API's lifespan ends: stopping the live-event reader (app/live.py) never hangs, even when the
stop lands while the reader awaits Redis (a cancel swallowed there used to leave it looping)."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from core import store
from tests.helpers import make_settings


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
