"""core/sources/: every dataset source the spec accepts has its module in one registry, and the
worker's folder for it comes from that module (real Redis, real folders, the engine's real
ImageFolder builder for torchvision's FakeData)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spkd.common.errors import SpkdError
from spkd.common.spec import DatasetSpec
from spkd.core import sources
from spkd.models.data import hub
from tests.helpers import make_folder

NAMED = {"path": "colors", "id": "ds_abc", "hf": "beans", "torchvision": "FakeData"}


def test_every_source_the_spec_accepts_is_registered_once() -> None:
    assert set(sources.SOURCES) == set(NAMED)
    for field, value in NAMED.items():
        assert sources.of(DatasetSpec.model_validate({field: value})) is sources.SOURCES[field]


def test_a_path_source_is_trained_on_where_it_lies(r, keys, settings) -> None:
    make_folder(Path(settings.data_root) / "colors", {"red": 3, "blue": 3})
    where = sources.Located(r, keys, settings, "owner")
    ds = DatasetSpec.model_validate({"path": "colors"})
    located = sources.locate(where, ds)
    with sources.materialise(where, ds, located, None, hub) as folder:
        assert folder == located == (Path(settings.data_root) / "colors").resolve()


def test_an_upload_of_another_key_is_not_found(r, keys, settings) -> None:
    where = sources.Located(r, keys, settings, "owner")
    with pytest.raises(SpkdError) as e:
        sources.locate(where, DatasetSpec.model_validate({"id": "ds_abc"}))
    assert (e.value.code, e.value.field) == ("dataset_not_found", "dataset.id")


def test_a_torchvision_source_is_built_by_the_engine(r, keys, settings, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    where = sources.Located(r, keys, settings, "owner")
    ds = DatasetSpec.model_validate({"torchvision": "FakeData", "split": "test"})
    assert sources.locate(where, ds) is None  # nothing on disk yet: the worker builds it
    with sources.materialise(where, ds, None, None, hub) as folder:
        assert folder.is_relative_to(tmp_path / "torch" / "spkd-imagefolders") and (folder / "train").is_dir()
