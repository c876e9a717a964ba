"""A refused dataset upload leaves nothing behind: the data root is listed before and after every
refusal path (too large by Content-Length or while streaming, too many entries, a zip bomb by its
headers or by its real bytes, not a zip, a corrupt zip, unsafe paths, no images, one class, no
file, a bad multipart body, a bad name), each both scanned in the request (201/4xx) and in the
background (202, then `failed`); a client that disconnects mid-upload; the job store going away
mid-upload; and, with SPKD_STORAGE_URL, nothing in the bucket either. Real app (in-process and a
real `spkd serve`), real Redis (a private one for the outage), real files, a real S3 server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from spkd.app.main import create_app
from spkd.cli import procs
from spkd.core import store
from spkd.core.settings import Settings
from tests.app.test_hostile_uploads import _lying_header_bomb, jpeg, make_zip
from tests.helpers import KEY_A, PrivateRedis, SeaweedS3, make_settings, make_stack

LIMITS = {"max_files": 50, "max_uncompressed_bytes": 1_000_000, "max_upload_bytes": 3_000_000}


def listing(root: Path) -> list[str]:
    """Every path under the data root, with the size of each file."""
    return sorted(
        f"{p.relative_to(root).as_posix()} {p.stat().st_size if p.is_file() else 'dir'}"
        for p in root.rglob("*")
    )


def two_classes() -> dict[str, bytes]:
    return {"a/1.jpg": jpeg(), "b/2.jpg": jpeg()}


# name -> (request keyword arguments, the code it is refused with)
ZIP = {"Content-Type": "application/zip"}
REFUSALS = {
    "over the upload limit by Content-Length": (
        {"content": b"\0" * 3_000_001, "headers": ZIP},
        "upload_too_large",
    ),
    "over the upload limit while streaming": (
        {"content": "stream 4 MB", "headers": ZIP},  # a fresh generator per request (see _request)
        "upload_too_large",
    ),
    "too many entries": (
        {"content": make_zip({f"a/{i}.jpg": b"" for i in range(60)}), "headers": ZIP},
        "too_many_files",
    ),
    "bomb by its headers": (
        {"content": make_zip({"a/x.jpg": jpeg(), "b/big.jpg": b"\0" * 2_000_000}), "headers": ZIP},
        "archive_too_large",
    ),
    "bomb with lying headers": ({"content": _lying_header_bomb(), "headers": ZIP}, None),
    "not a zip": ({"content": b"<html>no</html>" * 100, "headers": ZIP}, "invalid_archive"),
    "corrupt zip": ({"content": make_zip(two_classes())[:-30], "headers": ZIP}, "invalid_archive"),
    "zip-slip": (
        {"content": make_zip({"../../evil.jpg": jpeg(), "b/x.jpg": jpeg()}), "headers": ZIP},
        "unsafe_archive",
    ),
    "no images": ({"content": make_zip({"a/x.jpg": b"text", "b/y.jpg": b"text"}), "headers": ZIP}, None),
    "one class": (
        {"content": make_zip({"a/x.jpg": jpeg(), "a/y.jpg": jpeg()}), "headers": ZIP},
        "too_few_classes",
    ),
    "empty body": ({"content": b"", "headers": ZIP}, "missing_file"),
    "multipart without a file": ({"data": {"name": "x"}, "files": {"other": (None, "v")}}, "missing_file"),
    "malformed multipart": (
        {"content": b"--b\r\nnonsense", "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
        None,
    ),
    "name with a bidi override": (
        {"files": {"file": ("d.zip", make_zip(two_classes()))}, "data": {"name": "x\u202egpj"}},
        "invalid_request",
    ),
}


@pytest.mark.parametrize("background", [False, True], ids=["scanned-in-request", "scanned-in-background"])
def test_every_refused_upload_leaves_the_data_root_as_it_was(settings: Settings, background: bool) -> None:
    s = settings.model_copy(update={**LIMITS, "upload_sync_max_bytes": 0 if background else 10**9})
    root = Path(s.data_root)
    outcomes = {}
    with TestClient(create_app(s)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        ok = c.post("/v1/datasets", content=make_zip(two_classes()), headers=ZIP)  # a kept one beside
        assert ok.status_code in (201, 202), ok.text
        wait_done(c, ok)
        for label, (kwargs, code) in REFUSALS.items():
            before = listing(root)
            resp = c.post("/v1/datasets", **_request(kwargs))
            got = wait_done(c, resp)
            outcomes[label] = got
            assert got["status"] == "failed" and (code is None or got["code"] == code), (label, got)
            assert listing(root) == before, label
        print(outcomes)
        ids = {d["id"]: d["status"] for d in c.get("/v1/datasets").json()["data"]}
    assert [p.name for p in (root / "datasets").iterdir()] == [ok.json()["id"]], ids


def _request(kwargs: dict) -> dict:
    """The keyword arguments of one request; a streamed body (no Content-Length) made afresh."""
    if kwargs.get("content") == "stream 4 MB":
        return {**kwargs, "content": (b"\0" * 1_000_000 for _ in range(4))}
    return kwargs


def wait_done(c: TestClient, resp) -> dict:
    """{status: ready|failed, code} of an upload answered now (4xx/201) or later (202)."""
    if resp.status_code >= 400:
        return {"status": "failed", "code": resp.json()["error"]["code"], "http": resp.status_code}
    if resp.status_code == 201:
        return {"status": "ready", "code": None}
    assert resp.status_code == 202, resp.text
    url = resp.headers["location"]
    procs.wait_until(lambda: c.get(url).json()["status"] != "validating", 60, "the background validation", [])
    ds = c.get(url).json()
    return {"status": ds["status"], "code": (ds.get("error") or {}).get("code"), "http": 202}


# ---------------------------------------------------------------- real server: the connection breaks


def _start_upload(port: int, total: int, first: bytes, chunked: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    s.sendall(
        (
            f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nContent-Type: application/zip\r\n"
            f"Authorization: Bearer {KEY_A}\r\n{length}\r\n\r\n"
        ).encode()
    )
    s.sendall(_frame(first, chunked))
    return s


def _frame(data: bytes, chunked: bool) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n" if chunked else data


def _receiving(root: Path, at_least: int) -> bool:
    """The route is writing the upload (so it passed auth): a temporary zip of `at_least` bytes."""
    return any(p.stat().st_size >= at_least for p in root.glob("datasets/.upload-*/upload.zip"))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_client_that_disconnects_mid_upload_leaves_nothing(
    tmp_path: Path, redis_url: str, chunked: bool
) -> None:
    st = make_stack(tmp_path, redis_url)
    root = Path(st.settings.data_root)
    try:
        st.start_api()
        st.wait_api()
        before = listing(root)
        s = _start_upload(st.port, 50_000_000, b"\0" * 2_000_000, chunked)
        procs.wait_until(lambda: _receiving(root, 1_000_000), 30, "the upload to start", [])
        s.close()  # gone mid-body
        procs.wait_until(lambda: listing(root) == before, 30, "the upload's temporaries to go", [])
        assert listing(root) == before
    finally:
        st.stop()
        store.delete_prefix(store.connect(redis_url), st.settings.redis_prefix)


@pytest.mark.parametrize("background", [False, True], ids=["scanned-in-request", "scanned-in-background"])
def test_the_store_going_away_mid_upload_leaves_nothing(
    tmp_path: Path, private_redis: PrivateRedis, background: bool
) -> None:
    """Redis stops while the zip is still arriving (after auth): the upload ends 503
    store_unavailable, and neither the zip nor an extracted folder stays on the data root."""
    st = make_stack(tmp_path, private_redis.url, upload_sync_max_bytes=0 if background else 10**9)
    root = Path(st.settings.data_root)
    data = make_zip(two_classes() | {f"b/{i}.jpg": jpeg() for i in range(200)})
    half = len(data) // 2
    try:
        st.start_api()
        st.wait_api()
        before = listing(root)
        s = _start_upload(st.port, len(data), data[:half], chunked=False)
        procs.wait_until(lambda: _receiving(root, half), 30, "the upload to start", [])
        private_redis.kill()
        s.sendall(data[half:])
        answer = _read_answer(s)
        assert answer.startswith(b"HTTP/1.1 503") and b"store_unavailable" in answer, answer[:300]
        assert listing(root) == before
    finally:
        st.stop()


def _read_answer(s: socket.socket) -> bytes:
    """The whole HTTP answer: its head, then as many body bytes as its Content-Length says."""
    answer = b""
    s.settimeout(60)
    while b"\r\n\r\n" not in answer and (more := s.recv(65536)):
        answer += more
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length and (more := s.recv(65536)):
        body += more
    s.close()
    return head + b"\r\n\r\n" + body


# ---------------------------------------------------------------- with a bucket


@pytest.fixture
def bucket_settings(tmp_path: Path, redis_url: str, s3_server: SeaweedS3) -> Iterator[Settings]:
    prefix = f"leftovers-{time.time_ns()}"
    s = make_settings(tmp_path, redis_url, **LIMITS, **s3_server.settings(prefix))
    yield s
    store.delete_prefix(store.connect(redis_url), s.redis_prefix)


@pytest.mark.parametrize("background", [False, True], ids=["scanned-in-request", "scanned-in-background"])
def test_refused_uploads_leave_nothing_in_the_bucket(
    bucket_settings: Settings, s3_server: SeaweedS3, background: bool
) -> None:
    s = bucket_settings.model_copy(update={"upload_sync_max_bytes": 0 if background else 10**9})
    prefix = s.storage_url.split("/", 3)[3]
    root = Path(s.data_root)
    with TestClient(create_app(s)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        before = listing(root)
        for label in ("bomb with lying headers", "too many entries", "no images", "corrupt zip", "one class"):
            kwargs, _ = REFUSALS[label]
            assert wait_done(c, c.post("/v1/datasets", **_request(kwargs)))["status"] == "failed", label
            assert listing(root) == before, label
            assert [k for k in s3_server.keys(prefix) if "/datasets/" in k] == [], label
        # the bucket is in use: an accepted upload lands there, not on the data root
        assert (
            wait_done(c, c.post("/v1/datasets", content=make_zip(two_classes()), headers=ZIP))["status"]
            == "ready"
        )
        assert any("/datasets/" in k for k in s3_server.keys(prefix))
        assert listing(root) == before


def test_a_validation_rerun_after_one_that_died_having_extracted_starts_clean(settings: Settings) -> None:
    """A validation that died after extracting (the API killed before it saved the record) left
    the dataset's folder; the re-run (the restart sweep claims it) replaces it instead of failing."""
    from spkd.app import validation

    r, keys = store.connect(settings.redis_url), store.Keys(settings.redis_prefix)
    ds_id = store.new_id("ds")
    uploads = Path(settings.data_root) / "datasets"
    uploads.mkdir(parents=True, exist_ok=True)
    validation.pending_zip(settings, ds_id).write_bytes(make_zip(two_classes()))
    (uploads / ds_id / "a").mkdir(parents=True)
    (uploads / ds_id / "a" / "half-written.jpg").write_bytes(b"\0" * 10)  # the dead run's folder
    v = validation.Validator(r, keys, settings)
    try:
        owner = store.owner_of(KEY_A)
        v.begin(validation.validating_record(ds_id, owner, "again", 0, time.time()))

        def done() -> bool:
            return store.get_dataset(r, keys, ds_id)["status"] != "validating"

        procs.wait_until(done, 60, "the validation", [])
    finally:
        v.close()
    ds = store.get_dataset(r, keys, ds_id)
    assert ds["status"] == "ready" and ds["num_images"] == 2, ds
    assert sorted(p.relative_to(uploads).as_posix() for p in uploads.rglob("*") if p.is_file()) == [
        f"{ds_id}/a/1.jpg",
        f"{ds_id}/b/2.jpg",
    ]
