"""What the service keeps in object storage (core/blobs.py has the interface and the layout):
uploaded datasets, epoch-end checkpoints and artifacts, and a worker's local dataset cache.

Used only when `SPKD_STORAGE_URL` names a bucket (`blobs.remote(settings)` is not None); with
shared folders none of this runs. Torch-free: the API and the workers both use it.

Dataset cache (one per host, `SPKD_DATASET_CACHE_ROOT`):

    <cache>/<ds id>/            a complete copy (renamed into place after the last file arrived)
    <cache>/.<ds id>.lock       fcntl lock: held exclusively while fetching, shared while a job
                                trains on the copy (eviction skips a copy somebody holds)
    <cache>/<ds id>/.spkd-used  touched at every use: the LRU order
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import redis

from spkd.common.files import sha256_file
from spkd.core import attempts, store
from spkd.core.blobs import MANIFEST, BlobStore, StorageUnavailable, remote
from spkd.core.settings import Settings

log = logging.getLogger("spkd.bucket")
USED = ".spkd-used"
LAST = attempts.LAST
STORE_MARKER = ".spkd-store"
JOB_ID = re.compile(r"job_[0-9a-z]{20}")
DATASET_ID = re.compile(r"ds_[0-9a-z]{20}")
TRANSFER_THREADS = 16
T = TypeVar("T")


# ---------------------------------------------------------------- keys


def dataset_prefix(ds_id: str) -> str:
    return f"datasets/{ds_id}/"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def artifact_key(job_id: str, name: str, output: str | None = None) -> str:
    """The object of artifact `name` of the attempt folder `output` (the job record's; None: a job
    stored before attempt folders). Each attempt uploads under its own prefix (core/attempts.py)."""
    return f"jobs/{job_id}/{output}/artifacts/{name}" if output else f"jobs/{job_id}/artifacts/{name}"


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/{attempts.CHECKPOINTS}/"


# ---------------------------------------------------------------- datasets


def publish_dataset(blobs: BlobStore, folder: Path, ds_id: str) -> dict[str, Any]:
    """Upload an extracted dataset folder: every regular file, then the manifest (files with size
    and sha256, symlinks with their targets) last: a dataset without a manifest is incomplete.
    Returns the manifest. Raises StorageUnavailable."""
    regular: list[Path] = []
    links: dict[str, str] = {}
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs + names):
            p = Path(root) / name
            if p.is_symlink():
                links[p.relative_to(folder).as_posix()] = os.readlink(p)
            elif p.is_file():
                regular.append(p)

    def put(p: Path) -> tuple[str, dict[str, Any]]:
        rel = p.relative_to(folder).as_posix()
        digest = blobs.put_file(dataset_prefix(ds_id) + rel, p)
        return rel, {"size": p.stat().st_size, "sha256": digest}

    files = dict(_parallel(put, regular))
    manifest = {"files": files, "links": links}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(manifest, f)
    try:
        blobs.put_file(dataset_prefix(ds_id) + MANIFEST, Path(f.name))
    finally:
        os.unlink(f.name)
    return manifest


def keep_upload(settings: Settings, folder: Path) -> None:
    """An extracted and scanned upload (`<uploads>/<ds id>`): with a bucket configured, published
    there and removed from this host (workers fetch it from the bucket); else left where it is.
    A failed publish removes the folder and the objects sent so far, then raises
    StorageUnavailable: nothing is kept, the upload can be retried."""
    bucket = remote(settings)
    if bucket is None:
        return
    ds_id = folder.name
    try:
        publish_dataset(bucket, folder, ds_id)
    except StorageUnavailable:
        with contextlib.suppress(StorageUnavailable):
            bucket.delete_prefix(dataset_prefix(ds_id))
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parallel(fn: Callable[[Any], T], items: list[Any]) -> list[T]:
    """fn over items on TRANSFER_THREADS threads (one request per small file: latency-bound);
    the first error is raised once the others have stopped."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        futures = [pool.submit(fn, i) for i in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _read_manifest(blobs: BlobStore, ds_id: str, into: Path) -> dict[str, Any]:
    path = into / MANIFEST
    blobs.get_file(dataset_prefix(ds_id) + MANIFEST, path)
    return json.loads(path.read_text())


def _lock_file(cache: Path, ds_id: str) -> Path:
    return cache / f".{ds_id}.lock"


def _download_dataset(blobs: BlobStore, ds_id: str, dest: Path) -> None:
    """Manifest first (FileNotFoundError: no complete upload), then every file, then the links;
    built in a temporary folder beside `dest` and renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{ds_id}-", dir=dest.parent))
    try:
        manifest = _read_manifest(blobs, ds_id, tmp)
        _parallel(lambda rel: blobs.get_file(dataset_prefix(ds_id) + rel, tmp / rel), list(manifest["files"]))
        for rel, target in manifest["links"].items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, tmp / rel)
        (tmp / MANIFEST).unlink()
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_dataset(blobs: BlobStore, settings: Settings, ds_id: str) -> tuple[Path, IO[str]]:
    """The local copy of dataset `ds_id`, downloaded once per host. Returns (folder, a handle
    holding a shared lock on it: keep it open while training, close it after). Two jobs on one
    dataset: the second waits for the first one's download and uses the same copy. Then trims
    the cache to SPKD_DATASET_CACHE_BYTES. Raises FileNotFoundError (no complete upload),
    StorageUnavailable."""
    cache = Path(settings.dataset_cache_root).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / ds_id
    held = _lock_file(cache, ds_id).open("a")
    try:
        fcntl.flock(held, fcntl.LOCK_SH)  # a copy in use by other jobs: no need to wait for them
        if not dest.is_dir():
            fcntl.flock(held, fcntl.LOCK_UN)
            fcntl.flock(held, fcntl.LOCK_EX)  # one download; a second job waits for it
            if not dest.is_dir():
                t0 = time.monotonic()
                _download_dataset(blobs, ds_id, dest)
                log.info("dataset %s fetched into the cache in %.1fs", ds_id, time.monotonic() - t0)
            fcntl.flock(held, fcntl.LOCK_SH)  # converted: what a training job holds
        (dest / USED).touch()
    except BaseException:
        held.close()
        raise
    trim_cache(cache, settings.dataset_cache_bytes)
    return dest, held


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _remove_dead_fetches(cache: Path) -> None:
    """`.fetch-<ds id>-*` folders of a download whose process died (nobody holds the dataset's
    lock exclusively: a live download does) and `.evict-*` folders an eviction left."""
    for d in cache.glob(".evict-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in cache.glob(".fetch-*"):
        ds_id = d.name.removeprefix(".fetch-").rsplit("-", 1)[0]
        with _lock_file(cache, ds_id).open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being downloaded now
            shutil.rmtree(d, ignore_errors=True)
            fcntl.flock(f, fcntl.LOCK_UN)


def trim_cache(cache: Path, limit: int) -> list[str]:
    """Remove the least recently used copies until the cache holds at most `limit` bytes; a copy
    a job holds (shared lock) or that is being fetched is skipped. Returns the removed ids."""
    _remove_dead_fetches(cache)
    copies = []
    for d in cache.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            used = d / USED
            copies.append((used.stat().st_mtime if used.exists() else 0.0, d))
    sizes = {d: _tree_bytes(d) for _, d in copies}
    total = sum(sizes.values())
    removed = []
    for _, d in sorted(copies, key=lambda c: c[0]):
        if total <= limit:
            break
        with _lock_file(cache, d.name).open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use
            try:
                gone = cache / f".evict-{d.name}-{os.getpid()}"
                d.rename(gone)
                shutil.rmtree(gone, ignore_errors=True)
                total -= sizes[d]
                removed.append(d.name)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    if removed:
        log.info("dataset cache trimmed: removed %s", ", ".join(removed))
    return removed


# ---------------------------------------------------------------- checkpoints


class CheckpointPublisher:
    """Publishes an attempt's `checkpoints/` folder (core/attempts.py) to the bucket after each
    epoch-end checkpoint, under `jobs/<job>/checkpoints/attempt-<n>/`: the files that changed
    since the last publish (size, mtime), last.pt last (it names the stage files it relies on,
    which are therefore already there). Hidden temporaries and the export staging folder stay
    local. Raises StorageUnavailable."""

    def __init__(self, blobs: BlobStore, job_id: str, attempt_dir: Path, attempt: int) -> None:
        self.blobs, self.job_id, self.attempt = blobs, job_id, attempt
        self.folder = Path(attempt_dir) / attempts.CHECKPOINTS
        self._sent: dict[str, tuple[int, int]] = {}

    def __call__(self) -> int:
        folder = self.folder
        if not (folder / LAST).is_file():
            return 0
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        names = [n for n in names if n != LAST] + [LAST]
        sent = 0
        for name in names:
            p = folder / name
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            if self._sent.get(name) == stamp:
                continue
            self.blobs.put_file(f"{checkpoint_prefix(self.job_id)}{attempts.name(self.attempt)}/{name}", p)
            self._sent[name] = stamp
            sent += 1
        return sent


def _remote_attempts(blobs: BlobStore, job_id: str) -> dict[int, list[str]]:
    """attempt number -> file names, for each published attempt folder that holds a last.pt."""
    found: dict[int, list[str]] = {}
    prefix = checkpoint_prefix(job_id)
    for b in blobs.list(prefix):
        parts = b.key[len(prefix) :].split("/")
        n = attempts.number(parts[0]) if len(parts) == 2 else None
        if n is not None:
            found.setdefault(n, []).append(parts[1])
    return {n: names for n, names in found.items() if LAST in names}


def fetch_checkpoint(blobs: BlobStore, job_id: str, job_root: Path, before: int) -> int | None:
    """Bring the newest published checkpoint of an attempt earlier than `before` into that
    attempt's folder under `job_root` when it is newer than every local one (a job resumed on
    another host). Files first, last.pt last (core/attempts.open_attempt trusts a folder with a
    last.pt). Returns the attempt fetched, or None."""
    remote_attempts = {n: v for n, v in _remote_attempts(blobs, job_id).items() if n < before}
    if not remote_attempts:
        return None
    newest = max(remote_attempts)
    local = attempts.earlier_checkpoints(job_root, before)
    if local and local[-1][0] >= newest:
        return None
    folder = Path(job_root) / attempts.name(newest) / attempts.CHECKPOINTS
    names = sorted(remote_attempts[newest])
    for name in [n for n in names if n != LAST] + [LAST]:
        blobs.get_file(f"{checkpoint_prefix(job_id)}{attempts.name(newest)}/{name}", folder / name)
    return newest


def has_checkpoint(blobs: BlobStore, job_id: str) -> bool:
    return bool(_remote_attempts(blobs, job_id))


# ---------------------------------------------------------------- artifacts


def upload_artifacts(
    blobs: BlobStore, job_id: str, out_dir: Path, artifacts: list[dict[str, Any]], check: Callable[[], None]
) -> None:
    """Upload each collected artifact ({name, size, sha256}) of the attempt folder `out_dir` under
    that attempt's own prefix, with its sha256; `check` runs between files (a fencing check: a
    stale attempt stops uploading; one frozen mid-upload writes only its own prefix, which the
    job record never names). The caller registers the artifacts only after this returned: a
    failed upload registers nothing. Raises StorageUnavailable."""
    for a in artifacts:
        check()
        path = Path(out_dir) / a["name"]
        if sha256_file(path) != a["sha256"]:
            raise RuntimeError(f"artifact {a['name']} changed after it was collected")
        blobs.put_file(artifact_key(job_id, a["name"], Path(out_dir).name), path, a["sha256"])


# ---------------------------------------------------------------- leftovers


def _store_owns(objects: BlobStore, r: redis.Redis, keys: store.Keys) -> bool:
    """Whether this Redis namespace owns the bucket prefix (a `.spkd-store` object with its id,
    written on the first sweep), so objects without a record are orphans and not another spkd
    store's data, nor a wiped Redis's: the rule the shared folders follow (core/storage.py)."""
    current = r.get(keys.store_id())
    if current is None:
        r.set(keys.store_id(), secrets.token_hex(16), nx=True)
        current = r.get(keys.store_id())
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "marker"
        try:
            objects.get_file(STORE_MARKER, marker)
        except FileNotFoundError:
            marker.write_text(f"{current}\n")
            objects.put_file(STORE_MARKER, marker)
            return True
        claimed = marker.read_text().strip()
    if claimed != current:
        log.warning(
            "the bucket prefix belongs to another spkd store (%s, this one is %s): no sweep", claimed, current
        )
    return claimed == current


def sweep_orphans(objects: BlobStore, r: redis.Redis, keys: store.Keys, cutoff: float) -> list[str]:
    """Delete the objects of datasets and jobs that have no record in this store and none of
    whose objects was written after `cutoff` (unix seconds; an upload in flight keeps writing):
    left by an API killed between publishing an upload and saving its record, or by a delete
    while the bucket was unreachable. Returns the ids. Raises StorageUnavailable, redis errors."""
    if not _store_owns(objects, r, keys):
        return []
    removed = []
    kinds = (("datasets/", DATASET_ID, keys.dataset, dataset_prefix), ("jobs/", JOB_ID, keys.job, job_prefix))
    for top, pattern, record, prefix in kinds:
        for name in objects.children(top):
            if not pattern.fullmatch(name) or r.exists(record(name)):
                continue
            found = objects.list(prefix(name))
            if found and max(b.mtime for b in found) >= cutoff:
                continue
            if not r.exists(record(name)):  # not recorded meanwhile
                objects.delete_prefix(prefix(name))
                removed.append(name)
    if removed:
        log.warning("swept %d orphaned prefixes from the bucket: %s", len(removed), ", ".join(removed[:20]))
    return removed


def delete_job(blobs: BlobStore, job_id: str) -> int:
    return blobs.delete_prefix(job_prefix(job_id))


def delete_dataset(blobs: BlobStore, ds_id: str) -> int:
    return blobs.delete_prefix(dataset_prefix(ds_id))
