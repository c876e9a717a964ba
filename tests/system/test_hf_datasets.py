"""`dataset.hf` (models/data/hub.py): a Hugging Face dataset, here one the test builds with the
`datasets` library and saves with `save_to_disk` under the data root (no internet needed), trains
through the real API and worker with the class names of its ClassLabel feature; the API refuses
hub names when SPKD_HUB_DATASETS=false and keeps hf paths out of the uploads area. Real hub
downloads are not tested here (no internet)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from common import scan
from core import store
from models.data import hub
from tests.helpers import HYMENOPTERA, KEY_A, Service, make_settings, tiny_spec, wait_job_over_http

CLASSES = ["ants", "bees"]


def save_small_dataset(dest: Path, per_class: int = 4) -> Path:
    """A DatasetDict (train + validation) of hymenoptera photos, label a ClassLabel, saved to disk."""
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    parts = {}
    for split, src in (("train", "train"), ("validation", "val")):
        rows: dict[str, list] = {"image": [], "label": []}
        for label, cls in enumerate(CLASSES):
            for p in sorted((HYMENOPTERA / src / cls).glob("*.jpg"))[:per_class]:
                rows["image"].append(Image.open(p).convert("RGB").resize((48, 48)))
                rows["label"].append(label)
        parts[split] = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict(parts).save_to_disk(str(dest))
    return dest


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    return {"HF_HOME": str(home / "hf"), "TORCH_HOME": str(home / "torch")}


def test_materialise_gives_the_scanner_an_imagefolder(tmp_path: Path) -> None:
    saved = save_small_dataset(tmp_path / "saved")
    folder = hub.materialise("saved", saved, tmp_path / "cache")
    found = scan.scan_tree(folder)
    assert found.classes == CLASSES
    assert found.counts() == {"train": {"ants": 4, "bees": 4}, "val": {"ants": 4, "bees": 4}}
    assert hub.materialise("saved", saved, tmp_path / "cache") == folder  # built once
    only = hub.materialise("saved", saved, tmp_path / "cache", split="validation")
    assert only != folder and (only / "train").is_dir() and not (only / "validation").exists()
    with pytest.raises(hub.SpkdError) as e:
        hub.materialise("saved", saved, tmp_path / "cache", label_col="nope")
    assert e.value.code == "dataset_column_not_found" and e.value.field == "dataset.label_column"


def test_job_on_a_saved_hf_dataset_trains_with_its_class_names(service: Service) -> None:
    save_small_dataset(Path(service.settings.data_root) / "hf" / "mini")
    with service.client() as c:
        resp = c.post("/v1/jobs", json=tiny_spec({"hf": "hf/mini"}))
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        job = wait_job_over_http(c, job_id, 300, service.logs)
        assert job["status"] == "succeeded", (job["error"], service.logs())
        cfg = c.get(f"/v1/jobs/{job_id}/artifacts/student.json").json()
        assert cfg["class_names"] == CLASSES


@pytest.fixture
def offline_client(tmp_path: Path, redis_url: str) -> Iterator[TestClient]:
    s = make_settings(tmp_path, redis_url, hub_datasets=False)
    with TestClient(create_app(s)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        yield c
    store.delete_prefix(store.connect(redis_url), s.redis_prefix)


def test_hub_names_refused_when_hub_datasets_off(offline_client: TestClient) -> None:
    resp = offline_client.post("/v1/jobs", json=tiny_spec({"hf": "beans"}))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "hub_datasets_disabled" and err["field"] == "dataset.hf"
    assert "SPKD_HUB_DATASETS" in err["message"]


def test_hf_paths_follow_the_data_root_rules(client) -> None:
    for bad in ("../outside", "datasets/ds_abc"):  # outside the data root; the uploads area
        resp = client.post("/v1/jobs", json=tiny_spec({"hf": bad}))
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "dataset_path_not_allowed" and err["field"] == "dataset.hf", err
    both = client.post("/v1/jobs", json=tiny_spec({"hf": "beans", "path": "x"}))
    assert both.status_code == 422


# ------------------------------------------------------------------ dataset.torchvision
# FakeData is torchvision's generated dataset (no download): the same code path as CIFAR10 & co.


def test_torchvision_dataset_becomes_an_imagefolder(tmp_path: Path) -> None:
    folder = hub.materialise_torchvision("FakeData", tmp_path)
    found = scan.scan_tree(folder)
    n = hub.FAKEDATA_SIZES
    assert found.classes == ["0", "1"] and sorted(found.folders) == ["test", "train"]
    assert sum(found.counts()["train"].values()) == n["train"]
    assert sum(found.counts()["test"].values()) == n["test"]
    assert hub.materialise_torchvision("FakeData", tmp_path) == folder  # built once
    only = hub.materialise_torchvision("FakeData", tmp_path, split="test")
    assert only != folder and sorted(scan.scan_tree(only).folders) == ["train"]


def test_job_on_a_torchvision_dataset_trains(service: Service) -> None:
    with service.client() as c:
        resp = c.post("/v1/jobs", json=tiny_spec({"torchvision": "FakeData"}))
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        job = wait_job_over_http(c, job_id, 300, service.logs)
        assert job["status"] == "succeeded", (job["error"], service.logs())
        assert c.get(f"/v1/jobs/{job_id}/artifacts/student.json").json()["class_names"] == ["0", "1"]
        assert job["metrics"]["dataset"]["roles"]["report"] == "test/"  # its own test split is reported


def test_torchvision_names_are_checked_and_downloads_refused_offline(offline_client: TestClient) -> None:
    unknown = offline_client.post("/v1/jobs", json=tiny_spec({"torchvision": "NotADataset"}))
    assert unknown.status_code == 422 and "CIFAR10" in unknown.json()["error"]["message"], unknown.text
    cifar = offline_client.post("/v1/jobs", json=tiny_spec({"torchvision": "CIFAR10"}))
    assert cifar.status_code == 422, cifar.text
    err = cifar.json()["error"]
    assert err["code"] == "hub_datasets_disabled" and err["field"] == "dataset.torchvision"
    fake = offline_client.post("/v1/jobs", json=tiny_spec({"torchvision": "FakeData"}))
    assert fake.status_code == 201, fake.text  # generated, nothing to download
