"""Files on the shared volumes: leftovers, and removing a job's or dataset's files.

Torch-free; the API and the workers both use it. Layout (see core/store/ for the Redis side):

    <data root>/datasets/<ds id>/            an uploaded dataset (record: P:dataset:<ds id>)
    <data root>/datasets/.upload-*, .extract-*   an upload in flight (tempfile names)
    <artifact root>/<job id>/                a job's outputs (record: P:job:<job id>)
    <artifact root>/<job id>/attempt-<n>/    what attempt n wrote (core/attempts.py); the record's
                                             `output` names the one whose files are the artifacts
    <artifact root>/<job id>/**/.<name>.*, *.tmp   a file being written (files.atomic_write, ONNX export)
    <either root>/.deleting-*                a folder being removed (renamed out of sight first)

Leftovers come from killed processes (an API restarted mid-upload, a job process killed mid-write)
and from a store write that failed after the files were in place. `sweep` removes them, but only
what nothing has touched for `SPKD_ORPHAN_GRACE_S` (an upload in flight keeps writing), and
unrecorded dataset/job folders only when the Redis namespace is the one these folders belong to
(a marker file per root, see `_store_owns`): a wiped Redis or a changed `SPKD_REDIS_PREFIX` must not
make every folder look orphaned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

import redis

from spkd.common.files import storage_full as storage_full  # workers/runner.py asks storage.storage_full
from spkd.core import attempts, blobs, bucket, references, store
from spkd.core.settings import Settings

log = logging.getLogger("spkd.storage")

DELETING = ".deleting-"
UPLOAD_TEMPORARIES = (".upload-", ".extract-", DELETING)
JOB_DIR = re.compile(r"^job_[0-9a-z]{20}$")
DATASET_DIR = re.compile(r"^ds_[0-9a-z]{20}$")
MARKER = ".spkd-store"


# ---------------------------------------------------------------- paths


def job_dir(settings: Settings, job_id: str) -> Path:
    return Path(settings.artifact_root).resolve() / job_id


def has_checkpoint(settings: Settings, job_id: str) -> bool:
    """A job has an epoch-end checkpoint to resume from: a non-empty last.pt (written atomically,
    so a non-empty one is complete) of any attempt's folder (core/attempts.py)."""
    found = attempts.earlier_checkpoints(job_dir(settings, job_id), before=sys.maxsize)
    if any((e.checkpoints / attempts.LAST).stat().st_size > 0 for e in found):
        return True
    remote = blobs.remote(settings)  # published by a worker on another host (core/bucket.py)
    return remote is not None and bucket.has_checkpoint(remote, job_id)


# ---------------------------------------------------------------- removing


def remove_tree(path: Path) -> bool:
    """Remove a folder (or file): first renamed to `.deleting-<name>-<random>` in the same folder,
    so it is out of sight at once and a crash midway leaves only a name the sweep removes.
    Returns False when there was nothing to remove."""
    if not os.path.lexists(path):
        return False
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return True
    hidden = path.parent / f"{DELETING}{path.name}-{secrets.token_hex(4)}"
    try:
        path.rename(hidden)
    except FileNotFoundError:  # removed by someone else meanwhile
        return False
    shutil.rmtree(hidden, ignore_errors=True)
    return True


def _job_temporary(name: str) -> bool:
    # atomic_write's ".<name>.<random>" and the ONNX export's "<name>.onnx.tmp" (+ side files).
    return name.startswith(".") or ".tmp" in name


def remove_temporaries(out_dir: Path, older_than: float | None = None) -> list[Path]:
    """Delete a job's half-written files. Without `older_than` (unix seconds) call it only while
    holding the job's lease (nobody else writes there); with it, only files untouched since then."""
    removed = []
    if not out_dir.is_dir():
        return removed
    for p in out_dir.rglob("*"):
        if p.is_file() and _job_temporary(p.name):
            try:
                if older_than is None or p.lstat().st_mtime < older_than:
                    p.unlink()
                    removed.append(p)
            except FileNotFoundError:
                continue
    return removed


def last_activity(path: Path) -> float:
    """The newest modification time of `path` and everything under it (unix seconds): an upload,
    extraction or job in flight keeps writing, so an old value means nothing works there."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return time.time()  # gone or renamed meanwhile: treat as active, leave it alone
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


# ---------------------------------------------------------------- the sweep


def _store_owns(r: redis.Redis, keys: store.Keys, root: Path) -> bool:
    """Whether this Redis namespace owns the folders under `root`, so a folder without a record is
    an orphan and not someone else's (or a wiped store's) data.

    The namespace has a random id (P:store_id, set once); each root (the data root, the artifact
    root) gets a `.spkd-store` file with it on the first sweep. A root whose file names another id,
    or an id the store lost, is left alone (logged): delete the file by hand to adopt the folders."""
    marker = root / MARKER
    current = r.get(keys.store_id())
    if marker.is_file():
        claimed = marker.read_text().strip()
        if claimed == current:
            return True
        log.warning(
            "%s belongs to another spkd store (%s, this one is %s): orphans there are not removed",
            root,
            claimed,
            current,
        )
        return False
    if current is None:
        r.set(keys.store_id(), secrets.token_hex(16), nx=True)
        current = r.get(keys.store_id())
    try:
        marker.write_text(f"{current}\n")
    except OSError as e:  # full or read-only: no claim, no orphan removal this time
        log.warning("could not write %s: %s", marker, e)
        return False
    return True


def _sweep_datasets(r: redis.Redis, keys: store.Keys, root: Path, cutoff: float) -> list[Path]:
    removed = []
    owned = _store_owns(r, keys, root.parent)  # the marker in the data root: datasets/ holds only datasets
    for entry in sorted(root.iterdir()):
        if not DATASET_DIR.match(entry.name) or r.exists(keys.dataset(entry.name)):
            continue
        if owned and last_activity(entry) < cutoff and not r.exists(keys.dataset(entry.name)):
            remove_tree(entry)
            removed.append(entry)
    return removed


def _sweep_jobs(r: redis.Redis, keys: store.Keys, root: Path, cutoff: float) -> list[Path]:
    removed: list[Path] = []
    owned = _store_owns(r, keys, root)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(DELETING):
            if last_activity(entry) < cutoff and remove_tree(entry):
                removed.append(entry)
            continue
        if not JOB_DIR.match(entry.name) or not entry.is_dir():
            continue
        if r.exists(keys.job(entry.name)):
            if not store.lease_held(r, keys, entry.name):  # nobody runs it: old temporaries are junk
                removed += remove_temporaries(entry, older_than=cutoff)
                removed += _stale_attempts(r, keys, entry, cutoff)
            continue
        if owned and last_activity(entry) < cutoff and not r.exists(keys.job(entry.name)):
            remove_tree(entry)
            removed.append(entry)
    return removed


def _stale_attempts(r: redis.Redis, keys: store.Keys, job_root: Path, cutoff: float) -> list[Path]:
    """Attempt folders of a job nobody runs that nothing will read again, untouched since `cutoff`:
    all but the one its record names as its output and the newest one with a checkpoint (the
    next attempt starts from it). A stale attempt that thawed after the job ended leaves these."""
    keep = {r.hget(keys.job(job_root.name), "output")}
    earlier = attempts.earlier_checkpoints(job_root, before=sys.maxsize)
    if earlier:
        keep.add(earlier[-1].results.name)
    stale = [
        d
        for d in sorted(job_root.iterdir())
        if attempts.number(d.name) is not None and d.name not in keep and last_activity(d) < cutoff
    ]
    return [d for d in stale if remove_tree(d)]


def sweep(r: redis.Redis, keys: store.Keys, settings: Settings, grace_s: float | None = None) -> list[Path]:
    """Remove leftovers untouched for `grace_s` (default SPKD_ORPHAN_GRACE_S) seconds: upload and
    deletion temporaries, half-written files of jobs nobody runs, and dataset and job folders
    without a record in this store; with a bucket, also its orphaned objects (core/bucket.py,
    logged there). Returns what was removed from local folders. Raises redis errors (the caller
    logs them); upload temporaries are swept before Redis is asked anything."""
    cutoff = time.time() - (settings.orphan_grace_s if grace_s is None else grace_s)
    ds_root = references.datasets_dir(settings)
    removed = [
        e
        for e in sorted(ds_root.iterdir())
        if e.name.startswith(UPLOAD_TEMPORARIES) and last_activity(e) < cutoff and remove_tree(e)
    ]
    removed += _sweep_datasets(r, keys, ds_root, cutoff)
    art_root = Path(settings.artifact_root).resolve()
    if art_root.is_dir():
        removed += _sweep_jobs(r, keys, art_root, cutoff)
    if removed:
        log.warning("swept %d leftovers: %s", len(removed), ", ".join(p.name for p in removed[:20]))
    remote = blobs.remote(settings)
    if remote is not None:  # the bucket's own leftovers (logged there; not files of this host)
        try:
            bucket.sweep_orphans(remote, r, keys, cutoff)
        except blobs.StorageUnavailable as e:
            log.warning("bucket not swept: %s", e.message)
    return removed


# ---------------------------------------------------------------- deleting and retention


def delete_job(r: redis.Redis, keys: store.Keys, settings: Settings, job_id: str, owner: str | None = None):
    """Delete a finished job: its records (store.delete_job), then its files. Returns the deleted
    job, or None when it does not exist (or belongs to another owner). Raises store.Conflict while
    it is queued or running. Files left by a crash here are an orphan folder the sweep removes."""
    job = store.delete_job(r, keys, job_id, owner)
    if job is not None:
        remove_tree(job_dir(settings, job_id))
        delete_objects(settings, bucket.delete_job, job_id)
    return job


def delete_objects(settings: Settings, delete, what_id: str) -> None:
    """Remove a deleted record's objects from the bucket (if one is configured). The record is
    gone already; a bucket that fails here leaves objects no record names (logged, not raised)."""
    remote = blobs.remote(settings)
    if remote is None:
        return
    try:
        delete(remote, what_id)
    except blobs.StorageUnavailable as e:
        log.warning("%s: objects left in the bucket: %s", what_id, e.message)


def delete_dataset(
    r: redis.Redis, keys: store.Keys, settings: Settings, ds_id: str, owner: str | None = None
):
    """Delete a dataset's record (store.delete_dataset), then its folder. Returns the record or
    None; raises store.Conflict (with the job ids) while an active job uses it."""
    ds = store.delete_dataset(r, keys, ds_id, owner)
    if ds is not None:
        remove_tree(references.datasets_dir(settings) / ds_id)
        delete_objects(settings, bucket.delete_dataset, ds_id)
        # A large upload still validating: its zip (app.validation.pending_zip; the validation
        # then finds no record and keeps nothing).
        (references.datasets_dir(settings) / f".pending-{ds_id}.zip").unlink(missing_ok=True)
    return ds


def apply_retention(r: redis.Redis, keys: store.Keys, settings: Settings) -> list[str]:
    """SPKD_JOB_TTL_DAYS: delete jobs finished or paused longer ago than that (a status index's
    score is when the job entered that status) whose weights no active job uses (`weights:
    job:<id>`). SPKD_DATASET_TTL_DAYS: delete datasets uploaded longer ago that no queued, running
    or paused job uses. Unset: keep forever. What is kept is retried at the next pass. Returns the
    ids."""
    removed: list[str] = []
    t = time.time()
    if settings.job_ttl_days:
        cutoff = t - settings.job_ttl_days * 86400
        for status in store.AT_REST:
            for job_id in r.zrangebyscore(keys.status(status), "-inf", cutoff):
                try:
                    if delete_job(r, keys, settings, job_id) is not None:
                        removed.append(job_id)
                except store.InUse as e:  # an active job trains from its weights: next sweep
                    log.info("retention keeps job %s: used by %s", job_id, ", ".join(e.jobs))
                except store.Conflict:  # resumed meanwhile
                    continue
    if settings.dataset_ttl_days:
        cutoff = t - settings.dataset_ttl_days * 86400
        for key in r.scan_iter(match=keys.dataset("*"), count=1000):
            raw = r.get(key)
            if not raw or json.loads(raw).get("created_at", t) >= cutoff:
                continue
            try:
                ds = delete_dataset(r, keys, settings, key.rsplit(":", 1)[1])
            except store.Conflict:  # in use by a queued or running job: next sweep
                continue
            if ds is not None:
                removed.append(ds["id"])
    if removed:
        log.warning("retention removed %d jobs/datasets: %s", len(removed), ", ".join(removed[:20]))
    return removed
