"""A worker host's dataset cache (core/bucket.py): one download per dataset however many jobs ask
at once, a complete copy or none, and least-recently-used eviction that spares a copy in use.
Datasets come from a real local-folder object store (the blob backend the contract tests check
beside S3); the locks are real fcntl locks between threads with their own file descriptions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from spkd.core import blobs, bucket
from spkd.core.settings import Settings


class Counting(blobs.LocalBlobs):
    """The local store, counting the GETs of each key and slowing them down (a wide window for
    a second job to race the first one's download)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: dict[str, int] = {}
        self.lock = threading.Lock()

    def get_file(self, key: str, dest: Path) -> None:
        with self.lock:
            self.gets[key] = self.gets.get(key, 0) + 1
        time.sleep(0.02)
        super().get_file(key, dest)


def _dataset(root: Path, name: str, files: int = 5, size: int = 10_000) -> Path:
    for i in range(files):
        p = root / name / "train" / f"c{i % 2}" / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * size)
    (root / name / "link").symlink_to("train")
    return root / name


@pytest.fixture
def store(tmp_path: Path) -> Counting:
    return Counting(tmp_path / "bucket")


def _settings(tmp_path: Path, limit: int) -> Settings:
    return Settings(dataset_cache_root=tmp_path / "cache", dataset_cache_bytes=limit)


def test_two_jobs_on_one_dataset_download_it_once(store: Counting, tmp_path: Path) -> None:
    bucket.publish_dataset(store, _dataset(tmp_path / "src", "a"), "ds_a")
    settings = _settings(tmp_path, 10**9)
    got: list[Path] = []
    errors: list[BaseException] = []

    def job() -> None:
        try:
            folder, held = bucket.fetch_dataset(store, settings, "ds_a")
            with held:
                got.append(folder)
                assert len(list(folder.rglob("*.jpg"))) == 5
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(got) == 4 and len(set(got)) == 1
    assert set(store.gets.values()) == {1}, store.gets  # every file fetched exactly once
    assert (got[0] / "link").is_symlink() and (got[0] / "link" / "c0").is_dir()
    assert not list((tmp_path / "cache").glob(".fetch-*"))  # no temporary left


def test_a_failed_fetch_leaves_no_copy(store: Counting, tmp_path: Path) -> None:
    bucket.publish_dataset(store, _dataset(tmp_path / "src", "b"), "ds_b")
    store.delete("datasets/ds_b/train/c1/1.jpg")  # the bucket lost a file
    with pytest.raises(FileNotFoundError):
        bucket.fetch_dataset(store, _settings(tmp_path, 10**9), "ds_b")
    cache = tmp_path / "cache"
    assert not (cache / "ds_b").exists() and not list(cache.glob(".fetch-*"))
    with pytest.raises(FileNotFoundError):  # no manifest: an incomplete upload is never used
        bucket.fetch_dataset(store, _settings(tmp_path, 10**9), "ds_missing")


def test_lru_eviction_spares_a_copy_in_use(store: Counting, tmp_path: Path) -> None:
    for name in ("x", "y", "z"):
        bucket.publish_dataset(store, _dataset(tmp_path / "src", name), f"ds_{name}")
    settings = _settings(tmp_path, 120_000)  # two copies of ~50 KB fit, three do not
    cache = tmp_path / "cache"
    x, held_x = bucket.fetch_dataset(store, settings, "ds_x")  # a job trains on x all along
    _, held_y = bucket.fetch_dataset(store, settings, "ds_y")
    held_y.close()
    time.sleep(0.05)
    _, held_z = bucket.fetch_dataset(store, settings, "ds_z")  # over the limit: y goes, x is in use
    held_z.close()
    assert sorted(d.name for d in cache.iterdir() if not d.name.startswith(".")) == ["ds_x", "ds_z"]
    held_x.close()
    bucket.fetch_dataset(store, settings, "ds_y")[1].close()  # back, fetched again; now x is oldest
    assert sorted(d.name for d in cache.iterdir() if not d.name.startswith(".")) == ["ds_y", "ds_z"]
    assert store.gets["datasets/ds_y/train/c0/0.jpg"] == 2
