"""Object storage for datasets, checkpoints and artifacts: one small interface, two backends.

`LocalBlobs` keeps objects as files under a folder (the interface's reference backend, and what the
contract tests run beside S3); `S3Blobs` keeps them in an S3-compatible bucket. Which one the
service uses: `remote(settings)` returns `S3Blobs` when `SPKD_STORAGE_URL=s3://bucket/prefix`, else
None, and then API and workers share the data and artifact roots exactly as before.

Built on boto3 (botocore + s3transfer): the reference S3 client, kept by AWS, talks to any
S3-compatible server (SeaweedFS, MinIO, Ceph RGW, R2), signs presigned URLs without a round trip,
splits large files into multipart uploads (an object becomes visible only when its upload
completes: a partial upload is never seen), and needs nothing beyond urllib3, so the API image
stays small and torch-free. fsspec/s3fs would add aiobotocore and an async layer for nothing the
service needs.

Layout in the bucket (under the URL's prefix):

    datasets/<ds id>/<relative path>          an uploaded dataset's files
    datasets/<ds id>/.spkd-manifest.json       written last: files, sizes, symlinks (a dataset
                                               without it is incomplete and never fetched)
    jobs/<job id>/checkpoints/attempt-<n>/...  a run's epoch-end checkpoint (published at each end)
    jobs/<job id>/attempt-<n>/artifacts/<name> a job's results (the attempt its record names,
                                               core/attempts.py), sha256 in the object's metadata;
                                               jobs/<job id>/artifacts/<name> for older jobs

Every failure of a storage call (unreachable endpoint, timeouts, refused credentials, a 5xx) is
retried `SPKD_S3_RETRIES` times with exponential backoff from `SPKD_S3_BACKOFF_S`, then raised as
`StorageUnavailable` (a SpkdError, code `storage_unavailable`) whose message names the operation
and the error class only: never the credentials, never a URL with its query string.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from spkd.common.errors import SpkdError
from spkd.common.files import sha256_file
from spkd.core.settings import Settings

log = logging.getLogger("spkd.blobs")
T = TypeVar("T")
MANIFEST = ".spkd-manifest.json"
TMP_PREFIX = ".spkd-tmp-"  # LocalBlobs: a file being stored, never listed
SHA_META = "sha256"
CHUNK = 1 << 20


class StorageUnavailable(SpkdError):
    """The object storage could not be used (after the retries): the job can be resumed later."""

    def __init__(self, message: str) -> None:
        super().__init__("storage_unavailable", message, None)


@dataclass(frozen=True)
class Blob:
    key: str
    size: int
    mtime: float = 0.0  # unix seconds of the last write


class BlobStore(Protocol):
    """Keys are '/'-separated relative names ('jobs/job_x/artifacts/student.onnx')."""

    def put_file(
        self, key: str, path: Path, sha256: str | None = None, progress: Callable[[int], None] | None = None
    ) -> str:
        """Store `path` under `key` (all or nothing: what `progress(bytes sent)` raises aborts it
        and leaves no object); returns its sha256 (kept with the object)."""
        ...

    def get_file(self, key: str, dest: Path) -> None:
        """Write the object to `dest` (temp + rename); raises StorageUnavailable on a sha256 mismatch."""
        ...

    def list(self, prefix: str) -> list[Blob]: ...

    def children(self, prefix: str) -> list[str]:
        """The next '/'-level names under `prefix` ('datasets/' -> ['ds_a', 'ds_b']): one cheap
        listing, not every object below."""
        ...

    def exists(self, key: str) -> bool: ...

    def sha256(self, key: str) -> str | None: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def presign(self, key: str, ttl_s: int, filename: str | None = None) -> str: ...

    def iter_bytes(self, key: str) -> Iterator[bytes]: ...


# ---------------------------------------------------------------- local folder


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object key {key!r}")
    return key


class LocalBlobs:
    """Objects as files under `root`; each file's sha256 in `root/.meta/<key>` (written after the
    file, removed before it). Writes go to a hidden temporary and are renamed into place."""

    META = ".meta"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _meta(self, key: str) -> Path:
        return self.root / self.META / _check_key(key)

    def put_file(
        self, key: str, path: Path, sha256: str | None = None, progress: Callable[[int], None] | None = None
    ) -> str:
        digest = sha256 or sha256_file(path)
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
        os.close(fd)
        try:
            with Path(path).open("rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
            if sha256_file(Path(tmp)) != digest:
                raise StorageUnavailable(f"put {key}: the file changed while it was stored")
            meta = self._meta(key)
            meta.parent.mkdir(parents=True, exist_ok=True)
            self._meta(key).write_text(digest)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(key)
        expected = self.sha256(key)

        def fetch(tmp: str) -> str | None:
            shutil.copyfile(src, tmp)
            return expected

        _atomic_download(dest, fetch, key)

    def list(self, prefix: str) -> list[Blob]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""  # S3: a prefix, not a folder
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(self.root)
            if p.is_file() and rel.parts[0] != self.META and not p.name.startswith(TMP_PREFIX):
                st = p.stat()
                out.append(Blob(rel.as_posix(), st.st_size, st.st_mtime))
        return [b for b in out if b.key.startswith(prefix)]

    def children(self, prefix: str) -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != self.META)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def sha256(self, key: str) -> str | None:
        meta = self._meta(key)
        return meta.read_text().strip() if meta.is_file() else None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._meta(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        found = self.list(prefix)
        for b in found:
            self.delete(b.key)
        return len(found)

    def presign(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        return self._path(key).as_uri()  # a file needs no signature; the TTL does not apply

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self._path(key).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


def _atomic_download(dest: Path, fetch: Callable[[str], str | None], key: str) -> None:
    """`fetch(tmp)` writes the object `key` to the temporary `tmp` beside `dest` and returns its
    recorded sha256 (None: not recorded); the file replaces `dest` only when it matches. Raises
    StorageUnavailable on a mismatch; nothing is left behind when it fails."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        expected = fetch(tmp)
        if expected is not None and sha256_file(Path(tmp)) != expected:
            raise StorageUnavailable(f"get {key}: the object's content does not match its sha256")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- S3


class S3Blobs:
    """An S3 bucket (and key prefix) through boto3, with bounded retries (see the module doc)."""

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        import boto3  # only where object storage is configured
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(url or settings.storage_url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError("SPKD_STORAGE_URL must look like s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        self.retries, self.backoff_s = settings.s3_retries, settings.s3_backoff_s
        secret = settings.s3_secret_access_key.get_secret_value()
        self._secrets = [s for s in (secret, os.environ.get("AWS_SECRET_ACCESS_KEY", "")) if s]
        region = settings.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        config = Config(
            connect_timeout=settings.s3_timeout_s,
            read_timeout=settings.s3_timeout_s,
            retries={"total_max_attempts": 1},  # ours: bounded, logged, one policy for every call
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
            signature_version="s3v4",
            max_pool_connections=32,  # core.bucket transfers a dataset's files on 16 threads
        )
        session = boto3.session.Session(
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=secret or None,
            region_name=region or "us-east-1",
        )
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=config)
        public = settings.s3_public_endpoint_url
        self.signer = session.client("s3", endpoint_url=public, config=config) if public else self.client
        self.transfer = TransferConfig(multipart_threshold=64 * CHUNK, multipart_chunksize=16 * CHUNK)

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` with `SPKD_S3_RETRIES` attempts, backoff x2; a missing object is not retried."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except (ClientError, Boto3Error, BotoCoreError, OSError) as e:
                # upload_file wraps the ClientError in S3UploadFailedError: look at the cause.
                cause = e if isinstance(e, ClientError) else (e.__cause__ or e.__context__)
                if isinstance(cause, ClientError):
                    code = str(cause.response.get("Error", {}).get("Code", ""))
                    if code in ("404", "NoSuchKey", "NotFound"):
                        raise FileNotFoundError(what) from None
                    status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    why = f"{code or 'error'} (HTTP {status})"
                else:
                    why = type(e).__name__
            if attempt == self.retries:
                break
            log.warning(
                "storage: %s failed (%s); retry %d/%d in %.1fs", what, why, attempt, self.retries - 1, delay
            )
            time.sleep(delay)
            delay *= 2
        message = (
            f"the object storage failed on {what} after {self.retries} attempts: {why}; "
            "retry once it answers again (a job keeps its local checkpoint: resume it)"
        )
        raise StorageUnavailable(self._scrub(message)) from None

    def put_file(
        self, key: str, path: Path, sha256: str | None = None, progress: Callable[[int], None] | None = None
    ) -> str:
        digest = sha256 or sha256_file(path)
        extra = {"Metadata": {SHA_META: digest}}
        k = self._key(key)
        self._call(
            f"put {key}",
            lambda: self.client.upload_file(
                str(path), self.bucket, k, ExtraArgs=extra, Config=self.transfer, Callback=progress
            ),
        )
        return digest

    def get_file(self, key: str, dest: Path) -> None:
        """One GET: the body streamed to a temporary, checked against the sha256 in the same
        response's metadata (no HEAD first: a dataset of small files costs one request each)."""
        k = self._key(key)

        def fetch(tmp: str) -> str | None:
            res = self.client.get_object(Bucket=self.bucket, Key=k)
            with open(tmp, "wb") as out:
                for chunk in res["Body"].iter_chunks(CHUNK):
                    out.write(chunk)
            return res.get("Metadata", {}).get(SHA_META)

        _atomic_download(dest, lambda tmp: self._call(f"get {key}", lambda: fetch(tmp)), key)

    def list(self, prefix: str) -> list[Blob]:
        out: list[Blob] = []
        token: dict[str, Any] = {}
        while True:
            page = self._call(
                f"list {prefix}",
                lambda t=token: self.client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self.prefix + prefix, **t
                ),
            )
            out += [
                Blob(o["Key"][len(self.prefix) :], o["Size"], o["LastModified"].timestamp())
                for o in page.get("Contents", [])
            ]
            if not page.get("IsTruncated"):
                return out
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def children(self, prefix: str) -> list[str]:
        names: list[str] = []
        token: dict[str, Any] = {}
        full = self.prefix + prefix
        while True:
            page = self._call(
                f"list {prefix}",
                lambda t=token: self.client.list_objects_v2(
                    Bucket=self.bucket, Prefix=full, Delimiter="/", **t
                ),
            )
            names += [c["Prefix"][len(full) :].rstrip("/") for c in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return sorted(names)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _head(self, key: str) -> dict[str, Any] | None:
        k = self._key(key)
        try:
            return self._call(f"head {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=k))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def sha256(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get(SHA_META)

    def delete(self, key: str) -> None:
        k = self._key(key)
        self._call(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=k))

    def delete_prefix(self, prefix: str) -> int:
        found = self.list(_check_key(prefix.rstrip("/")) + "/")
        for i in range(0, len(found), 1000):
            batch = {"Objects": [{"Key": self.prefix + b.key} for b in found[i : i + 1000]], "Quiet": True}
            self._call(
                f"delete {prefix}", lambda b=batch: self.client.delete_objects(Bucket=self.bucket, Delete=b)
            )
        return len(found)

    def presign(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        k = self._key(key)
        body = self._call(f"get {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=k))["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()


def remote(settings: Settings) -> S3Blobs | None:
    """The bucket of `SPKD_STORAGE_URL`, or None when API and workers share their folders.
    One client per configuration and process (boto3 clients are thread-safe, not fork-safe)."""
    if not settings.storage_url:
        return None
    secret = settings.s3_secret_access_key.get_secret_value()
    fields = ("storage_url", "s3_endpoint_url", "s3_public_endpoint_url", "s3_region", "s3_access_key_id")
    key = (
        os.getpid(),
        *(getattr(settings, f) for f in fields),
        hashlib.sha256(secret.encode()).hexdigest(),
        settings.s3_retries,
        settings.s3_backoff_s,
        settings.s3_timeout_s,
    )
    if key not in _clients:
        _clients[key] = S3Blobs(settings)
    return _clients[key]


_clients: dict[tuple[Any, ...], S3Blobs] = {}
