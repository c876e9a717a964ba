"""Fixtures only the service tests use; the shared ones (Redis, settings, in-process app, a real
`spkd serve` + worker) are in tests/conftest.py, plain helpers in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers import small_imagefolder, zip_dir


@pytest.fixture(scope="session")
def small_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hym")
    return zip_dir(small_imagefolder(tmp / "hym", per_class=8), tmp / "hym.zip", prefix="hymenoptera/")
