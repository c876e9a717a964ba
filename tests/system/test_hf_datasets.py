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

from spkd.app.main import create_app
from spkd.common import scan
from spkd.core import store
from spkd.models.data import hub
from tests.helpers import (
    HYMENOPTERA,
    KEY_A,
    Service,
    make_folder,
    make_settings,
    tiny_spec,
    wait_job_over_http,
)

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
        cfg = c.get(f"/v1/jobs/{job_id}/artifacts/student/config.json").json()
        assert cfg["label_names"] == CLASSES


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
        assert c.get(f"/v1/jobs/{job_id}/artifacts/student/config.json").json()["label_names"] == ["0", "1"]
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


# ------------------------------------------------------------------ refused at submission
# What can be known without reading an image is refused with a 422 before the job is queued: a
# job that names an ImageFolder by dataset.hf was accepted and its worker died on load_from_disk.


def _save(dest: Path, parts: dict[str, dict], features: datasets.Features) -> Path:
    datasets.DatasetDict(
        {k: datasets.Dataset.from_dict(v, features=features) for k, v in parts.items()}
    ).save_to_disk(str(dest))
    return dest


def _refused(client, dataset: dict, code: str, field: str) -> str:
    resp = client.post("/v1/jobs", json=tiny_spec(dataset))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["field"]) == (code, field), err
    return err["message"]


def test_hf_source_misfits_are_refused_at_submission(client, settings) -> None:
    root = Path(settings.data_root)
    make_folder(root / "imgs" / "train", {"ants": 2, "bees": 2})  # an ImageFolder, not a saved dataset
    message = _refused(client, {"hf": "imgs"}, "dataset_not_saved", "dataset.hf")
    assert "save_to_disk" in message and "dataset.path" in message, message
    (root / "empty").mkdir()
    _refused(client, {"hf": "empty"}, "dataset_not_saved", "dataset.hf")

    img = Image.new("RGB", (8, 8))
    good = save_small_dataset(root / "saved", per_class=1)
    _refused(client, {"hf": "saved", "split": "nope"}, "dataset_split_not_found", "dataset.split")
    _refused(
        client, {"hf": "saved", "label_column": "nope"}, "dataset_column_not_found", "dataset.label_column"
    )
    _refused(
        client, {"hf": "saved", "image_column": "label"}, "dataset_column_not_image", "dataset.image_column"
    )
    ints = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    _save(root / "ints", {"train": {"image": [img, img], "label": [0, 1]}}, ints)
    _refused(client, {"hf": "ints"}, "dataset_not_classification", "dataset.label_column")
    labelled = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    _save(root / "notrain", {"test": {"image": [img, img], "label": [0, 1]}}, labelled)
    no_train = _refused(client, {"hf": "notrain"}, "dataset_split_not_found", "dataset.split")
    assert "train" in no_train and "test" in no_train, no_train
    # the reverse mistake: a saved dataset named as a folder of images
    _refused(client, {"path": "saved"}, "dataset_not_imagefolder", "dataset.path")
    assert client.get("/v1/jobs").json()["data"] == []  # nothing was queued

    assert client.post("/v1/jobs", json=tiny_spec({"hf": "saved"})).status_code == 201
    assert client.post("/v1/jobs", json=tiny_spec({"hf": "notrain", "split": "test"})).status_code == 201
    assert good.is_dir()


def test_other_sources_refuse_what_they_cannot_use(client, settings) -> None:
    make_folder(Path(settings.data_root) / "imgs", {"ants": 2, "bees": 2})
    _refused(client, {"torchvision": "FakeData", "split": "val"}, "dataset_split_not_found", "dataset.split")
    one_set = _refused(
        client, {"torchvision": "EuroSAT", "split": "train"}, "dataset_split_not_found", "dataset.split"
    )
    assert "one set" in one_set, one_set
    _refused(
        client, {"torchvision": "STL10", "split": "unlabeled"}, "dataset_split_not_found", "dataset.split"
    )
    for extra in ({"split": "test"}, {"revision": "main"}, {"image_column": "img"}, {"label_column": "y"}):
        field = f"dataset.{next(iter(extra))}"
        _refused(client, {"path": "imgs", **extra}, "dataset_field_not_applicable", field)
    _refused(
        client,
        {"torchvision": "FakeData", "revision": "v1"},
        "dataset_field_not_applicable",
        "dataset.revision",
    )
    assert (
        client.post("/v1/jobs", json=tiny_spec({"torchvision": "FakeData", "split": "test"})).status_code
        == 201
    )
    assert client.post("/v1/jobs", json=tiny_spec({"path": "imgs"})).status_code == 201


def test_torchvision_split_table_matches_torchvision(tmp_path: Path) -> None:
    """core.source_checks.TORCHVISION_SPLITS (the API cannot import torchvision) says what torchvision
    itself accepts: each listed split passes its argument check (the constructor then fails for the
    missing files, download off), an unlisted one is a ValueError; one-set datasets take no split."""
    import inspect

    import torchvision.datasets as tvd

    from spkd.common.spec import TORCHVISION_DATASETS
    from spkd.core.source_checks import TORCHVISION_SPLITS

    assert sorted(TORCHVISION_SPLITS) == sorted(TORCHVISION_DATASETS)
    for name, splits in TORCHVISION_SPLITS.items():
        cls = getattr(tvd, name)
        params = inspect.signature(cls).parameters
        if name == "FakeData":
            assert splits == tuple(hub.FAKEDATA_SIZES)
        elif "train" in params:
            assert splits == ("train", "test"), name
        elif "split" not in params:
            assert splits == (), name
        else:
            for split in (*splits, "no-such-split"):
                try:
                    cls(str(tmp_path), split=split)
                except ValueError as e:  # torchvision's check of the argument
                    assert split == "no-such-split", (name, split, e)
                except Exception:  # noqa: BLE001 - past the check: the files are missing (or h5py)
                    assert split != "no-such-split" or name == "PCAM", (name, split)


def test_materialise_refuses_a_folder_that_is_not_saved(tmp_path: Path) -> None:
    """The worker's side (models/hub.py), for a folder changed after submission."""
    make_folder(tmp_path / "imgs" / "train", {"ants": 2, "bees": 2})
    with pytest.raises(hub.SpkdError) as e:
        hub.materialise("imgs", tmp_path / "imgs", tmp_path / "cache")
    assert (e.value.code, e.value.field) == ("dataset_not_saved", "dataset.hf"), e.value
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "dataset_dict.json").write_text('{"splits": ["train"]}')  # a split folder that is not there
    with pytest.raises(hub.SpkdError) as e:
        hub.materialise("fake", fake, tmp_path / "cache")
    assert e.value.code in ("dataset_not_saved", "dataset_unreadable") and e.value.field == "dataset.hf"


# ------------------------------------------------------------------ bad rows
# A corrupt image in a saved dataset is skipped and listed with its reason, as a corrupt file in
# an ImageFolder is (common/scan.py); so is a row without a label (-1).

TRUNCATED = "a JPEG cut in half"


def save_with_bad_rows(dest: Path) -> Path:
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    rows: dict[str, list] = {"image": [], "label": []}
    for label, cls in enumerate(CLASSES):
        for p in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:4]:
            rows["image"].append({"bytes": p.read_bytes(), "path": p.name})
            rows["label"].append(label)
    jpeg = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))[5].read_bytes()
    rows["image"] += [
        {"bytes": b"this is not an image", "path": "notes.jpg"},  # row 8
        {"bytes": jpeg[: len(jpeg) // 2], "path": "cut.jpg"},  # row 9: truncated
        {"bytes": jpeg, "path": "unlabelled.jpg"},  # row 10: label -1
    ]
    rows["label"] += [0, 1, -1]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(dest))
    return dest


def test_bad_rows_are_skipped_and_listed_like_bad_files(tmp_path: Path) -> None:
    folder = hub.materialise("bad", save_with_bad_rows(tmp_path / "bad"), tmp_path / "cache")
    found = scan.scan_tree(folder)
    assert found.classes == CLASSES and found.counts() == {"train": {"ants": 4, "bees": 4}}
    reasons = {r["path"]: r["reason"] for r in found.rejected}
    assert reasons["train/ants/0000008.jpg"] == "not an image", reasons
    assert reasons["train/bees/0000009.jpg"].startswith("corrupt image"), reasons
    assert "row 10" in reasons["train/0000010"] and "-1" in reasons["train/0000010"], reasons
    assert len(reasons) == 3, reasons


def test_job_on_a_saved_dataset_with_bad_rows_succeeds_and_lists_them(service: Service) -> None:
    save_with_bad_rows(Path(service.settings.data_root) / "hf" / "bad")
    with service.client() as c:
        resp = c.post("/v1/jobs", json=tiny_spec({"hf": "hf/bad"}))
        assert resp.status_code == 201, resp.text
        job = wait_job_over_http(c, resp.json()["id"], 300, service.logs)
        assert job["status"] == "succeeded", (job["error"], service.logs())
        assert any("3 file(s) in the dataset were skipped" in w for w in job["warnings"]), job["warnings"]
        rejected = {r["path"]: r["reason"] for r in job["metrics"]["dataset"]["rejected"]}
        assert rejected["train/ants/0000008.jpg"] == "not an image", rejected
        assert rejected["train/bees/0000009.jpg"].startswith("corrupt image"), rejected
        assert "train/0000010" in rejected, rejected
