"""Fixtures of the API tests. The dashboard's browser test runs against the shared live stack (the
`service` fixture, tests/conftest.py): real uvicorn (`spkd serve`) + a real `spkd worker` on the
real Redis under a unique prefix/queue."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import KEY_A, Service


@pytest.fixture
def live_stack(service: Service) -> dict[str, Any]:
    return {
        "url": service.url,
        "api_key": KEY_A,
        "artifact_root": service.settings.artifact_root,
        "logs": service.logs,
        "settings": service.settings,
    }
