"""Test-only fault injection for a real `spkd worker` (tests/workers/test_job_failures.py).

Put this folder first on the worker's PYTHONPATH and set SPKD_TEST_FAULTS=1: Python's `site`
imports `sitecustomize` at start, and this one installs an import hook that, when the engine is
imported (the worker parent preloads it before forking job processes), wraps

- `models.pipeline.validate_job`: boundary `validating` (the runner calls it, once, while the
  job's status is `validating`);
- the body of every entry of `models.stages.STAGES`: boundaries `<stage>:before` and
  `<stage>:after` (inside the pipeline's loop, between its `stage_started` event and the stage's
  checkpoint).

A job whose spec says `metadata: {"spkd_test_fault": "<boundary>:<exception>"}` raises that
exception (`OSError` with errno EIO, `RuntimeError`, `MemoryError`, `FileNotFoundError`, a
`BaseException` subclass, or `RuntimeErrorWhileOOM`: a RuntimeError raised while a MemoryError is
handled) at that boundary; any other job runs untouched. Nothing else of the worker is replaced:
the runner, the store, Celery and the engine run as in production.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

KEY = "spkd_test_fault"


def fault(spec: Any, boundary: str) -> None:
    """Raise the exception the job's metadata asks for at `boundary`, if it names this one."""
    wanted = str((getattr(spec, "metadata", None) or {}).get(KEY, ""))
    where, _, kind = wanted.rpartition(":")
    if where != boundary:
        return
    if kind == "OSError":
        raise OSError(errno.EIO, "Input/output error (injected)", "/srv/injected/volume.bin")
    if kind == "FileNotFoundError":
        raise FileNotFoundError(errno.ENOENT, "No such file or directory (injected)", "/srv/gone/file.bin")
    if kind == "RuntimeError":
        raise RuntimeError(f"injected failure at {boundary}")
    if kind == "MemoryError":
        raise MemoryError()
    if kind == "BaseException":  # not an Exception, and neither SystemExit nor KeyboardInterrupt
        raise InjectedBaseException(f"injected at {boundary}")
    if kind == "RuntimeErrorWhileOOM":  # cleanup that fails while a MemoryError unwinds
        try:
            raise MemoryError()
        except MemoryError:
            raise RuntimeError("cleanup failed while handling the MemoryError")  # noqa: B904
    raise ValueError(f"{KEY}: unknown exception {kind!r}")


class InjectedBaseException(BaseException):
    """Like asyncio.CancelledError or a library's own BaseException: `except Exception` misses it."""


def _wrap_stage(name: str, body: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def faulty(run: Any) -> Any:
        fault(run.spec, f"{name}:before")
        result = body(run)
        fault(run.spec, f"{name}:after")
        return result

    return faulty


def _patch_stages(module: ModuleType) -> None:
    module.STAGES = tuple(
        dataclasses.replace(stage, body=_wrap_stage(stage.name, stage.body)) for stage in module.STAGES
    )


def _patch_pipeline(module: ModuleType) -> None:
    original = module.validate_job

    def validate_job(spec: Any, data_dir: Any) -> Any:
        fault(spec, "validating")
        return original(spec, data_dir)

    module.validate_job = validate_job


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "spkd.models.stages": _patch_stages,
    "spkd.models.pipeline": _patch_pipeline,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules like the normal path finder, then patches them once executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            PATCHES[name](module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("SPKD_TEST_FAULTS") == "1":
    sys.meta_path.insert(0, _AfterImport())
