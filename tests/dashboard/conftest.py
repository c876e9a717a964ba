"""A live stack for the browser test: `spkd serve` + `spkd worker` on the real Redis, own key prefix."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

REDIS_URL = os.environ.get("SPKD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SPKD = Path(sys.executable).parent / "spkd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # Each child leads its own process group (Celery forks a pool child): stop the whole group.
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _wait_ready(url: str, key: str, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    """/readyz turns ready once Redis answers and a worker has sent its heartbeat."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            res = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {key}"}, timeout=2)
            if res.status_code == 200 and res.json().get("status") == "ready":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tails = "\n".join(log.read_text()[-2000:] for log in logs)
    raise RuntimeError(f"the stack did not become ready:\n{tails}")


@pytest.fixture
def live_stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"needs a Redis server at {REDIS_URL}")
    prefix = f"spkd-test-dash-{uuid.uuid4().hex[:8]}"
    key = f"dash-{uuid.uuid4().hex}"
    port = _free_port()
    root = tmp_path / "stack"
    env = dict(
        os.environ,
        SPKD_REDIS_URL=REDIS_URL,
        SPKD_REDIS_PREFIX=prefix,
        SPKD_QUEUE=prefix,  # our own Celery queue: no other test's worker takes our jobs
        SPKD_API_KEYS=key,
        SPKD_DATA_ROOT=str(root / "data"),
        SPKD_ARTIFACT_ROOT=str(root / "artifacts"),
        SPKD_HUB_WEIGHTS="false",
        OMP_NUM_THREADS="1",
    )
    (root / "data").mkdir(parents=True)
    (root / "artifacts").mkdir()
    commands = {
        "api": [str(SPKD), "serve", "--host", "127.0.0.1", "--port", str(port)],
        "worker": [str(SPKD), "worker"],
    }
    procs, logs = [], []
    try:
        for name, cmd in commands.items():
            log = root / f"{name}.log"
            logs.append(log)
            with log.open("wb") as fh:
                out = {"stdout": fh, "stderr": subprocess.STDOUT}
                proc = subprocess.Popen(cmd, env=env, start_new_session=True, **out)
                procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, key, procs, logs)
        yield {"url": url, "api_key": key, "artifact_root": root / "artifacts", "logs": logs}
    finally:
        for p in reversed(procs):
            _stop(p)
        r = redis.Redis.from_url(REDIS_URL)
        for k in r.scan_iter(f"{prefix}:*", count=1000):
            r.delete(k)
        for k in r.scan_iter(f"*{prefix}*", count=1000):  # Celery's queue keys for our queue
            r.delete(k)
