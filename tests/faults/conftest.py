"""Fixtures for the fault tests. They reuse the service tests' launcher pieces (settings, env,
spawn/stop, readiness wait, data helpers) and add what faults need: a stack whose API and workers
can be killed and restarted one by one, and a private Redis with AOF that a test may stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from app import store
from app.settings import Settings
from tests.service.conftest import (  # noqa: F401 - fixtures re-exported for this package
    KEY_A,
    KEY_B,
    ROOT,
    _spawn,
    client,
    free_port,
    keys,
    make_settings,
    r,
    redis_url,
    settings,
    settings_env,
    small_imagefolder,
    stop_process,
    wait_ready,
)

SPKD = str(Path(sys.executable).parent / "spkd")


def tiny_spec(dataset: dict, **over: object) -> dict:
    """Tiny random-init models on a few photos: seconds per epoch on one CPU thread."""
    spec: dict = {
        "teacher": {"model": "test_efficientnet", "weights": "none"},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": dataset,
        "train": {"epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0},
        "baseline": False,
    }
    spec.update(over)
    return spec


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (the Celery pool process that runs a job)."""
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d.name))
    return kids


@dataclass
class Stack:
    """uvicorn + N `spkd worker` processes on loopback, each its own process group."""

    settings: Settings
    log_dir: Path
    port: int = field(default_factory=free_port)
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    _n: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def start_api(self) -> None:
        self._n += 1
        args = [SPKD, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.api = _spawn(args, self.env, self.log_dir / f"api-{self._n}.log")

    def start_worker(self, name: str) -> subprocess.Popen:
        self._n += 1
        args = [SPKD, "worker", "--name", name, "--loglevel", "INFO"]
        self.workers[name] = _spawn(args, self.env, self.log_dir / f"worker-{name}-{self._n}.log")
        return self.workers[name]

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and its job process (the whole process group): no cleanup at all."""
        p = self.workers.pop(name)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)

    def kill_job_process(self, name: str) -> int:
        """SIGKILL only the pool process running the job; the worker parent survives."""
        kids = children_of(self.workers[name].pid)
        assert kids, f"worker {name} has no pool process"
        for k in kids:
            os.kill(k, signal.SIGKILL)
        return len(kids)

    def kill_api(self) -> None:
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait(10)
        self.api = None

    def wait_api(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"API not up after {timeout} s\n{self.logs()}")

    def wait_ready(self, timeout: float = 90) -> None:
        procs = [p for p in [self.api, *self.workers.values()] if p is not None]
        wait_ready(self.url, timeout, procs)

    def client(self, key: str = KEY_A, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        for p in self.workers.values():
            stop_process(p, timeout=20)
        self.workers.clear()
        if self.api is not None:
            stop_process(self.api)
            self.api = None


def make_stack(tmp: Path, url: str, **over: object) -> Stack:
    s = make_settings(tmp, url, **over)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    # settings_env covers the common fields; pass the test's own overrides through as well.
    extra = {f"SPKD_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in over.items()}
    return Stack(settings=s, log_dir=logs, extra_env=extra)


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


# ---------------------------------------------------------------- events and statuses


def events(rc: redis.Redis, ks: store.Keys, job_id: str) -> list[dict]:
    return store.list_events(rc, ks, job_id, limit=10_000)


def wait_event(
    rc: redis.Redis,
    ks: store.Keys,
    job_id: str,
    match: Callable[[dict], bool],
    timeout: float,
    after: str = "0-0",
) -> dict:
    """Block on the job's event stream until an event matches (fast: XREAD BLOCK, no polling)."""
    deadline = time.monotonic() + timeout
    last = after
    while time.monotonic() < deadline:
        res = rc.xread({ks.events(job_id): last}, count=100, block=200)
        for _, entries in res or []:
            for entry_id, fields in entries:
                last = entry_id
                ev = store._event(entry_id, fields)
                if match(ev):
                    return ev
                if ev["kind"] == "status" and ev["data"].get("status") in store.FINAL:
                    raise AssertionError(f"job {job_id} ended before the event: {ev}")
    raise AssertionError(f"no matching event for {job_id} within {timeout} s")


def wait_final(rc: redis.Redis, ks: store.Keys, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get_job(rc, ks, job_id)
        if job and job["status"] in store.FINAL:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} not final after {timeout} s: {store.get_job(rc, ks, job_id)}")


def epoch_ends(evs: list[dict]) -> list[tuple[str, int]]:
    return [(e["data"]["stage"], e["data"]["epoch"]) for e in evs if e["kind"] == "epoch_end"]


def dump(evs: list[dict]) -> str:
    return "\n".join(f"{e['kind']}: {e['message']} {json.dumps(e['data'])[:160]}" for e in evs)


# ---------------------------------------------------------------- a Redis the test may kill


@dataclass
class PrivateRedis:
    """redis-server with AOF (appendfsync always) on its own port and folder."""

    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        log = (self.dir / "redis.log").open("a")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the AOF already holds survives."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    d = tmp_path / "redis"
    d.mkdir()
    pr = PrivateRedis(d)
    pr.start()
    yield pr
    if pr.proc is not None:
        pr.proc.kill()
        pr.proc.wait(10)
