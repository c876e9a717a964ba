"""Fixtures only the fault tests use: stacks whose API and workers a test kills and restarts one by
one, and a private Redis with AOF that a test may stop. The shared fixtures (Redis, settings,
in-process app) are in tests/conftest.py; Stack, PrivateRedis and the event waits in tests/helpers.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from core import store

from ..helpers import PrivateRedis, Stack, make_stack


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
    import os
    import subprocess

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
