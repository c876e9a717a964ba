"""Background validation of large uploads (docs/datasets.md): the route stores the zip beside
the uploads, saves the record `status: validating` and answers 202; a thread pool in the API
process extracts and scans it (app.datasets, the same code as a synchronous upload) and saves the
record `ready` (classes, counts, rejected) or `failed` with `error: {code, message}`.

Surviving restarts: a running validation holds a Redis lease (`<prefix>:dsval:<id>`, renewed every
lease_ttl_s/3). Every validating dataset id is in the set `<prefix>:dsvalidating`; each API
process sweeps that set at start and every lease_ttl_s/3: an id whose lease expired (its process
died) is claimed (SET NX) and validated again from its stored zip, or marked `failed` with
`validation_interrupted` when the zip is gone. At start, stored zips without a record are removed
once older than SPKD_ORPHAN_GRACE_S. Torch-free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from spkd.app import datasets
from spkd.app.errors import ApiError
from spkd.common.errors import SpkdError
from spkd.common.files import storage_full
from spkd.core import bucket, references, storage, store
from spkd.core.settings import Settings

log = logging.getLogger(__name__)

VALIDATING, READY, FAILED = "validating", "ready", "failed"


def pending_zip(settings: Settings, ds_id: str) -> Path:
    """Where a large upload's zip waits for its validation (inside the uploads area, so on the same
    filesystem as the extracted folder; the scanner never sees it: names starting '.' are skipped)."""
    return references.datasets_dir(settings) / f".pending-{ds_id}.zip"


def validating_record(
    ds_id: str, owner: str, name: str, size_bytes: int, created_at: float
) -> dict[str, Any]:
    """The record saved before the 202: no classes yet."""
    return {
        "id": ds_id,
        "owner": owner,
        "name": name,
        "created_at": created_at,
        "status": VALIDATING,
        "layout": None,
        "classes": [],
        "counts": {},
        "num_images": 0,
        "size_bytes": size_bytes,
        "rejected": [],
        "rejected_total": 0,
    }


def _unexpected(ds_id: str, e: Exception) -> dict[str, str]:
    """The `error` of a validation that failed for a reason other than the zip's content."""
    if storage_full(e) is not None:
        msg = "the dataset storage (SPKD_DATA_ROOT) is full: free space, then upload again"
        return {"code": "storage_full", "message": msg}
    if isinstance(e, SpkdError):  # storage_unavailable: the bucket did not take it (core/blobs.py)
        return {"code": e.code, "message": e.message}
    log.exception("dataset %s: validation crashed", ds_id)
    return {"code": "validation_error", "message": f"{type(e).__name__}: {e}"[:500]}


class Validator:
    """The API process's background validations: a small thread pool plus the restart sweeper."""

    def __init__(self, r: redis.Redis, keys: store.Keys, settings: Settings, workers: int = 2) -> None:
        self.r, self.keys, self.settings = r, keys, settings
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spkd-validate")
        self.stop = threading.Event()
        self.ttl_ms = max(1000, int(settings.lease_ttl_s * 1000))
        self._sweeper: threading.Thread | None = None

    # Redis names live here, not in store.Keys: only this module uses them.
    def validating_set(self) -> str:
        return f"{self.keys.prefix}:dsvalidating"

    def lease_key(self, ds_id: str) -> str:
        return f"{self.keys.prefix}:dsval:{ds_id}"

    def start(self) -> None:
        """Sweep now (a previous process may have died mid-validation), then every ttl/3."""
        self._sweeper = threading.Thread(target=self._sweep_loop, name="spkd-validate-sweep", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def accept(self, zip_path: Path, ds_id: str, owner: str, name: str) -> dict[str, Any]:
        """Move the received zip to pending_zip, save the `validating` record, start validating;
        returns the record (the 202's body)."""
        size = zip_path.stat().st_size
        pending = pending_zip(self.settings, ds_id)
        os.replace(zip_path, pending)
        record = validating_record(ds_id, owner, name, size, time.time())
        try:
            self.begin(record)
        except BaseException:
            # Refused (the store unreachable: 503): the zip must not outlive the request; nothing
            # would ever validate it, and the orphan sweep only runs when an API process starts.
            pending.unlink(missing_ok=True)
            with contextlib.suppress(redis.RedisError):
                self._forget(ds_id)
            raise
        return record

    def begin(self, record: dict[str, Any]) -> None:
        """Save the `validating` record and start its validation (the zip is already at pending_zip)."""
        ds_id = record["id"]
        self.r.set(self.lease_key(ds_id), "1", px=self.ttl_ms)
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self.validating_set(), ds_id)
        pipe.set(self.keys.dataset(ds_id), json.dumps(record))
        pipe.zadd(self.keys.datasets(record["owner"]), {ds_id: 0})
        pipe.execute()
        self.pool.submit(self._run, ds_id)

    def sweep(self) -> None:
        """Claim every validating dataset whose lease expired: validate again, or fail it."""
        for ds_id in self.r.smembers(self.validating_set()):
            ds_id = ds_id.decode() if isinstance(ds_id, bytes) else ds_id
            if not self.r.set(self.lease_key(ds_id), "1", px=self.ttl_ms, nx=True):
                continue  # someone (maybe this process) is on it
            record = store.get_dataset(self.r, self.keys, ds_id)
            if record is None or record.get("status") != VALIDATING:
                self._forget(ds_id)
            elif not pending_zip(self.settings, ds_id).is_file():
                msg = "the API stopped while validating this upload and its zip is gone: upload it again"
                self._finish(record, None, {"code": "validation_interrupted", "message": msg})
            else:
                log.info("dataset %s: validation resumed after a restart", ds_id)
                self.pool.submit(self._run, ds_id)

    def sweep_orphan_zips(self) -> None:
        """A zip stored without a record (the API died between the two; a crash mid-DELETE):
        removed once untouched for SPKD_ORPHAN_GRACE_S."""
        cutoff = time.time() - self.settings.orphan_grace_s
        for p in references.datasets_dir(self.settings).glob(".pending-*.zip"):
            ds_id = p.name[len(".pending-") : -len(".zip")]
            try:
                if p.stat().st_mtime < cutoff and not self.r.exists(self.keys.dataset(ds_id)):
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

    def _sweep_loop(self) -> None:
        first = True
        while not self.stop.is_set():
            try:
                if first:  # at start: before this process stores zips of its own
                    self.sweep_orphan_zips()
                    first = False
                self.sweep()
            except redis.RedisError as e:  # Redis away for a moment: next round
                log.warning("validation sweep: %s", e)
            self.stop.wait(self.ttl_ms / 3000)

    def _renew(self, ds_id: str, done: threading.Event) -> None:
        while not done.wait(self.ttl_ms / 3000):
            try:
                self.r.set(self.lease_key(ds_id), "1", px=self.ttl_ms)
            except redis.RedisError as e:
                log.warning("dataset %s: lease renewal failed: %s", ds_id, e)

    def _run(self, ds_id: str) -> None:
        """Extract + scan; the record ends `ready` or `failed` (never left `validating` while alive)."""
        done = threading.Event()
        threading.Thread(target=self._renew, args=(ds_id, done), daemon=True).start()
        record = store.get_dataset(self.r, self.keys, ds_id)
        try:
            if record is None or record.get("status") != VALIDATING:  # deleted, or done meanwhile
                return
            zip_path = pending_zip(self.settings, ds_id)
            dest = references.datasets_dir(self.settings) / ds_id
            # A validation of this id that died after extracting (its record still `validating`)
            # left this folder: start from nothing, or the extraction could not take its place.
            storage.remove_tree(dest)
            try:
                res = datasets.extract_dataset(zip_path, dest, self.settings)
            except ApiError as e:
                self._finish(record, None, {"code": e.code, "message": e.message})
                return
            except Exception as e:  # noqa: BLE001 - a record must not stay `validating` forever
                self._finish(record, None, _unexpected(ds_id, e))
                return
            self._finish(record, res, None)
        finally:
            done.set()

    def _finish(
        self, record: dict[str, Any], res: datasets.Extracted | None, error: dict[str, str] | None
    ) -> None:
        """Save the outcome only while the record is still `validating`: a dataset deleted meanwhile
        (DELETE /v1/datasets/{id}) stays deleted, and its extracted folder is removed."""
        ds_id = record["id"]
        if res is not None:
            new = datasets.dataset_record(ds_id, record["owner"], record["name"], res, self.settings)
            new["created_at"] = record["created_at"]
        else:
            new = {**record, "status": FAILED, "error": error}
            # The zip goes before the status says `failed`: whoever sees the final status must find
            # nothing left of the upload (a crash here ends `validation_interrupted`, also failed).
            pending_zip(self.settings, ds_id).unlink(missing_ok=True)

        def _tx(pipe: redis.client.Pipeline) -> bool:
            raw = pipe.get(self.keys.dataset(ds_id))
            if raw is None or json.loads(raw).get("status") != VALIDATING:
                return False
            pipe.multi()
            pipe.set(self.keys.dataset(ds_id), json.dumps(new))
            return True

        kept = self.r.transaction(_tx, self.keys.dataset(ds_id), value_from_callable=True)
        self._forget(ds_id)
        pending_zip(self.settings, ds_id).unlink(missing_ok=True)
        if not kept:
            shutil.rmtree(references.datasets_dir(self.settings) / ds_id, ignore_errors=True)
            storage.delete_objects(self.settings, bucket.delete_dataset, ds_id)  # published meanwhile

    def _forget(self, ds_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(self.validating_set(), ds_id)
        pipe.delete(self.lease_key(ds_id))
        pipe.execute()
