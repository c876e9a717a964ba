"""The Redis job store, moving into a package: every name is still `core.store.<name>`."""

from typing import Any

from core.store import jobs as _jobs


def __getattr__(name: str) -> Any:
    return getattr(_jobs, name)
