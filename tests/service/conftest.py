"""Fixtures for the service tests: the real Redis under a unique prefix, tmp data/artifact roots,
an in-process app (TestClient) and, for integration, real uvicorn + `spkd worker` subprocesses."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from app import store
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"
REDIS_URL = os.environ.get("SPKD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_A, KEY_B = "test-key-alice", "test-key-bob"


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _redis_up():
        pytest.fail(f"the service tests need a Redis server at {REDIS_URL} (scripts start one)")
    return REDIS_URL


def make_settings(tmp: Path, redis_url: str, **over: object) -> Settings:
    tag = uuid.uuid4().hex[:10]
    values: dict[str, object] = {
        "redis_url": redis_url,
        "redis_prefix": f"spkdtest-{tag}",
        "queue": f"spkdtest-{tag}",
        "api_keys": f"{KEY_A},{KEY_B}",
        "data_root": tmp / "data",
        "artifact_root": tmp / "artifacts",
        "weights_roots": str(tmp / "weights"),
        "hub_weights": False,
        "heartbeat_s": 1.0,
        "heartbeat_ttl_s": 5.0,
        "lease_ttl_s": 10.0,
        "cancel_poll_s": 0.2,
    }
    values.update(over)
    for d in ("data", "artifacts", "weights"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    return Settings(**values)


def settings_env(s: Settings) -> dict[str, str]:
    env = {
        "SPKD_REDIS_URL": s.redis_url,
        "SPKD_REDIS_PREFIX": s.redis_prefix,
        "SPKD_QUEUE": s.queue,
        "SPKD_API_KEYS": s.api_keys,
        "SPKD_DATA_ROOT": str(s.data_root),
        "SPKD_ARTIFACT_ROOT": str(s.artifact_root),
        "SPKD_WEIGHTS_ROOTS": s.weights_roots,
        "SPKD_HUB_WEIGHTS": str(s.hub_weights).lower(),
        "SPKD_HEARTBEAT_S": str(s.heartbeat_s),
        "SPKD_HEARTBEAT_TTL_S": str(s.heartbeat_ttl_s),
        "SPKD_LEASE_TTL_S": str(s.lease_ttl_s),
        "SPKD_CANCEL_POLL_S": str(s.cancel_poll_s),
    }
    return env


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
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        yield c


# ---------------------------------------------------------------- data


def small_imagefolder(dest: Path, per_class: int = 8) -> Path:
    """train/ and val/ with `per_class` real hymenoptera photos per class (JPEGs only)."""
    rng = random.Random(0)
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            files = sorted(p for p in (HYMENOPTERA / split / cls).iterdir() if p.suffix.lower() == ".jpg")
            out = dest / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for p in rng.sample(files, per_class):
                shutil.copy(p, out / p.name)
    return dest


def zip_dir(folder: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return dest


@pytest.fixture(scope="session")
def small_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hym")
    return zip_dir(small_imagefolder(tmp / "hym", per_class=8), tmp / "hym.zip", prefix="hymenoptera/")


# ---------------------------------------------------------------- real processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    url: str
    settings: Settings
    api: subprocess.Popen
    worker: subprocess.Popen
    log_dir: Path

    def client(self, key: str = KEY_A, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(self.log_dir.glob("*.log")))


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_process(p: subprocess.Popen, timeout: float = 15) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def wait_ready(url: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode}")
        try:
            resp = httpx.get(f"{url}/readyz", timeout=2)
            if resp.status_code == 200:
                return
            last = resp.text
        except httpx.TransportError as e:
            last = str(e)
        time.sleep(0.3)
    raise RuntimeError(f"service not ready after {timeout} s: {last}")


@pytest.fixture(scope="module")
def worker_env() -> dict[str, str]:
    """Extra environment for the worker process; a test module overrides it to pick a code path."""
    return {}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, worker_env: dict[str, str]
) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("svc")
    s = make_settings(tmp, redis_url)
    env = dict(os.environ, **settings_env(s), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    spkd = str(Path(sys.executable).parent / "spkd")
    port = free_port()
    logs = tmp / "logs"
    logs.mkdir()
    api = _spawn(
        [spkd, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env,
        logs / "api.log",
    )
    worker = _spawn([spkd, "worker", "--loglevel", "INFO"], {**env, **worker_env}, logs / "worker.log")
    svc = Service(f"http://127.0.0.1:{port}", s, api, worker, logs)
    try:
        wait_ready(svc.url, 60, [api, worker])
        yield svc
    except Exception:
        print(svc.logs())
        raise
    finally:
        stop_process(worker, timeout=20)
        stop_process(api)
        store.delete_prefix(store.connect(redis_url), s.redis_prefix)
