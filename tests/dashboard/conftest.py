"""The browser test runs against the service owner's live stack (tests/service/conftest.py):
real uvicorn (`spkd serve`) + a real `spkd worker` on the real Redis under a unique prefix/queue."""

from __future__ import annotations

from typing import Any

import pytest

from tests.service.conftest import KEY_A, Service, redis_url, service, worker_env  # noqa: F401 - fixtures reused


@pytest.fixture
def live_stack(service: Service) -> dict[str, Any]:  # noqa: F811 - the imported fixture
    return {
        "url": service.url,
        "api_key": KEY_A,
        "artifact_root": service.settings.artifact_root,
        "logs": service.logs,
    }
