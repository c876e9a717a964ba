"""The object storage interface (core/blobs.py): one contract, run on both backends: a local
folder and a real S3 server (SeaweedFS, the session's `s3_server`)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from boto3.s3.transfer import TransferConfig

from spkd.core import blobs
from spkd.core.settings import Settings
from tests.helpers import SeaweedS3


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> blobs.BlobStore:
    if request.param == "local":
        return blobs.LocalBlobs(tmp_path / "bucket")
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    settings = Settings(**server.settings(f"contract-{uuid.uuid4().hex[:8]}"), s3_retries=2, s3_backoff_s=0.1)
    return blobs.S3Blobs(settings)


def _file(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def test_put_get_list_exists_delete(store: blobs.BlobStore, tmp_path: Path) -> None:
    a = _file(tmp_path, "a.bin", os.urandom(3000))
    digest = store.put_file("jobs/j1/artifacts/a.bin", a)
    assert digest == hashlib.sha256(a.read_bytes()).hexdigest()
    store.put_file("jobs/j1/artifacts/sub/b.txt", _file(tmp_path, "b.txt", b"bee"))
    store.put_file("jobs/j2/artifacts/c.txt", _file(tmp_path, "c.txt", b"sea"))
    assert store.exists("jobs/j1/artifacts/a.bin") and not store.exists("jobs/j1/artifacts/zzz")
    assert store.sha256("jobs/j1/artifacts/a.bin") == digest
    listed = {b.key: b.size for b in store.list("jobs/j1/")}
    assert listed == {"jobs/j1/artifacts/a.bin": 3000, "jobs/j1/artifacts/sub/b.txt": 3}
    assert [b.key for b in store.list("jobs/j1/artifacts/s")] == ["jobs/j1/artifacts/sub/b.txt"]  # a prefix
    store.get_file("jobs/j1/artifacts/a.bin", tmp_path / "out" / "a.bin")
    assert (tmp_path / "out" / "a.bin").read_bytes() == a.read_bytes()
    assert b"".join(store.iter_bytes("jobs/j1/artifacts/sub/b.txt")) == b"bee"
    store.delete("jobs/j1/artifacts/a.bin")
    assert not store.exists("jobs/j1/artifacts/a.bin")
    assert store.delete_prefix("jobs/j1/") == 1
    assert store.list("jobs/j1/") == []
    assert [b.key for b in store.list("jobs/")] == ["jobs/j2/artifacts/c.txt"]  # the other job stays
    with pytest.raises(FileNotFoundError):
        store.get_file("jobs/j1/artifacts/a.bin", tmp_path / "gone")


def test_presigned_url_serves_the_object(store: blobs.BlobStore, tmp_path: Path) -> None:
    data = os.urandom(5000)
    store.put_file("jobs/j/artifacts/model.onnx", _file(tmp_path, "m", data))
    url = store.presign("jobs/j/artifacts/model.onnx", 60, "model.onnx")
    if url.startswith("file://"):
        assert Path(url.removeprefix("file://")).read_bytes() == data
        return
    res = httpx.get(url)
    assert res.status_code == 200 and res.content == data
    assert 'filename="model.onnx"' in res.headers["content-disposition"]
    assert httpx.get(url.replace("Signature=", "Signature=0")).status_code == 403  # signed: not forgeable


def test_a_changed_object_fails_its_sha256_check(
    store: blobs.BlobStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    digest = hashlib.sha256(b"original").hexdigest()
    store.put_file("k/x.bin", _file(tmp_path, "x", b"original"), sha256=digest)
    if isinstance(store, blobs.LocalBlobs):
        (store.root / "k" / "x.bin").write_bytes(b"tampered")
    else:
        server: SeaweedS3 = request.getfixturevalue("s3_server")
        key, meta = store.prefix + "k/x.bin", {"sha256": digest}
        server.client().put_object(Bucket=store.bucket, Key=key, Body=b"tampered", Metadata=meta)
    with pytest.raises(blobs.StorageUnavailable, match="does not match its sha256"):
        store.get_file("k/x.bin", tmp_path / "got")
    assert not (tmp_path / "got").exists()  # nothing half-checked left behind


def test_an_interrupted_upload_is_never_visible(store: blobs.BlobStore, tmp_path: Path) -> None:
    """A put that dies midway (multipart on S3: 11 MiB in 5 MiB parts) leaves no object, and an
    older object under the key stays as it was."""
    if isinstance(store, blobs.S3Blobs):
        five_mib = 5 << 20
        store.transfer = TransferConfig(
            multipart_threshold=five_mib, multipart_chunksize=five_mib, max_concurrency=1
        )
    big = _file(tmp_path, "big", os.urandom(11 << 20))
    sent = []

    def die_midway(n: int) -> None:
        sent.append(n)
        if sum(sent) > 5 << 20:
            raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError, match="connection lost"):
        store.put_file("jobs/j/artifacts/big.bin", big, progress=die_midway)
    assert sum(sent) > 5 << 20  # it really was under way
    assert not store.exists("jobs/j/artifacts/big.bin") and store.list("jobs/j/") == []
    store.put_file("jobs/j/artifacts/big.bin", _file(tmp_path, "old", b"old"))
    with pytest.raises(RuntimeError):
        store.put_file("jobs/j/artifacts/big.bin", big, progress=die_midway)
    assert b"".join(store.iter_bytes("jobs/j/artifacts/big.bin")) == b"old"


def test_unreachable_storage_is_retried_then_storage_unavailable(tmp_path: Path) -> None:
    """No server at the endpoint: SPKD_S3_RETRIES attempts with backoff, then one error whose
    message holds neither the secret nor the endpoint's query string."""
    secret = "s3cr3t-" + uuid.uuid4().hex
    settings = Settings(
        storage_url="s3://nobucket/p",
        s3_endpoint_url="http://127.0.0.1:9",  # discard port: connection refused
        s3_access_key_id="id",
        s3_secret_access_key=secret,
        s3_retries=3,
        s3_backoff_s=0.2,
        s3_timeout_s=2,
    )
    store = blobs.S3Blobs(settings)
    t0 = time.monotonic()
    with pytest.raises(blobs.StorageUnavailable) as err:
        store.put_file("a/b", _file(tmp_path, "f", b"x"))
    assert time.monotonic() - t0 >= 0.2 + 0.4  # two waits: 0.2 s, then 0.4 s
    assert err.value.code == "storage_unavailable" and "after 3 attempts" in err.value.message
    assert secret not in str(err.value) and secret not in repr(err.value.as_dict())


def test_presigned_urls_name_the_public_endpoint_and_expire(s3_server: SeaweedS3, tmp_path: Path) -> None:
    """SPKD_S3_PUBLIC_ENDPOINT_URL: clients get URLs for the address they reach, signed for it
    (the server checks the host), valid SPKD_S3_PRESIGN_TTL_S seconds; then refused."""
    public = s3_server.endpoint.replace("127.0.0.1", "localhost")  # another name, same server
    settings = Settings(**s3_server.settings(f"pub-{uuid.uuid4().hex[:8]}"), s3_public_endpoint_url=public)
    store = blobs.S3Blobs(settings)
    store.put_file("a/x", _file(tmp_path, "x", b"payload"))
    url = store.presign("a/x", 2)
    assert url.startswith(public + "/") and "X-Amz-Expires=2" in url
    assert httpx.get(url).content == b"payload"
    time.sleep(3)
    assert httpx.get(url).status_code == 403


def test_sweep_removes_unrecorded_prefixes_after_the_grace_only(
    store: blobs.BlobStore, tmp_path: Path, redis_url: str
) -> None:
    """core/bucket.sweep_orphans: a dataset and a job with no record (an API killed after the
    publish, a delete while the bucket was down) go once untouched past the grace; recorded ones,
    recent ones, and every prefix of a bucket another spkd store claimed stay."""
    from spkd.core import bucket
    from spkd.core import store as jobstore

    r, keys = jobstore.connect(redis_url), jobstore.Keys(f"spkdtest-{uuid.uuid4().hex[:10]}")
    try:
        ids = {n: f"{n}_{uuid.uuid4().hex[:20]}" for n in ("ds", "job")}
        kept_ds = f"ds_{uuid.uuid4().hex[:20]}"
        f = _file(tmp_path, "f", b"x")
        for key in (
            f"datasets/{ids['ds']}/a.jpg",
            f"jobs/{ids['job']}/artifacts/m",
            f"datasets/{kept_ds}/a.jpg",
        ):
            store.put_file(key, f)
        r.set(keys.dataset(kept_ds), "{}")
        assert bucket.sweep_orphans(store, r, keys, cutoff=time.time() - 3600) == []  # too recent
        assert sorted(bucket.sweep_orphans(store, r, keys, cutoff=time.time() + 1)) == sorted(ids.values())
        assert [b.key for b in store.list("datasets/")] == [f"datasets/{kept_ds}/a.jpg"]
        assert store.list("jobs/") == []
        other = jobstore.Keys(f"spkdtest-{uuid.uuid4().hex[:10]}")  # a second store, same bucket
        assert bucket.sweep_orphans(store, r, other, cutoff=time.time() + 1) == []
        assert store.exists(f"datasets/{kept_ds}/a.jpg")
    finally:
        jobstore.delete_prefix(r, keys.prefix)


def test_dot_files_are_objects_like_any_other(store: blobs.BlobStore, tmp_path: Path) -> None:
    """A dataset's `.spkd-unextracted.json` or a user's `.hidden` file: listed, and removed with
    its prefix (the local backend's own temporaries are not objects)."""
    store.put_file("datasets/ds_x/.hidden", _file(tmp_path, "h", b"h"))
    store.put_file("datasets/ds_x/a/b.jpg", _file(tmp_path, "b", b"b"))
    assert sorted(b.key for b in store.list("datasets/ds_x/")) == [
        "datasets/ds_x/.hidden",
        "datasets/ds_x/a/b.jpg",
    ]
    assert store.children("datasets/") == ["ds_x"] and store.children("datasets/ds_x/") == ["a"]
    assert store.delete_prefix("datasets/ds_x") == 2 and store.list("datasets/") == []
