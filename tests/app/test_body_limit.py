"""Request bodies are capped before anything parses them (app/middleware.py): SPKD_MAX_BODY_BYTES for
every route, SPKD_MAX_UPLOAD_BYTES for dataset uploads; 413 with the JSON error shape, by the
Content-Length at once, and by counting a chunked body's bytes as they arrive. Against a real
`spkd serve` over raw sockets (how many bytes went out before the answer came is the proof that
the body was not read first), plus the in-process app for the shape of every answer."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from spkd.app.main import create_app
from spkd.core.settings import Settings
from tests.helpers import KEY_A, Stack, running, tiny_spec

LIMIT = 100_000  # SPKD_MAX_BODY_BYTES in these tests
UPLOAD_LIMIT = 2_000_000  # SPKD_MAX_UPLOAD_BYTES
BIG = 50_000_000  # what the client would send


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str):
    from tests.helpers import make_stack

    st = make_stack(
        tmp_path_factory.mktemp("limit"), redis_url, max_body_bytes=LIMIT, max_upload_bytes=UPLOAD_LIMIT
    )
    with running(st):
        st.start_api()
        st.wait_api()
        yield st


def _send_until_answered(s: socket.socket, pieces: Iterator[bytes], seconds: float) -> tuple[int, bytes]:
    """Send `pieces` until the server answers or closes, they run out, or `seconds` passed (a
    bound, never an assertion). Returns (body bytes sent, the answer)."""
    sent, answer, pending = 0, b"", memoryview(b"")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readable, writable, _ = select.select([s], [s] if pending or pieces else [], [], 1.0)
        if readable:
            with contextlib.suppress(ConnectionResetError):
                answer = s.recv(65536)
            break
        if writable:
            if not pending:
                piece = next(pieces, None)
                if piece is None:  # all sent: wait for the answer
                    pieces = None  # type: ignore[assignment]
                    continue
                pending = memoryview(piece)
            try:
                n = s.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            pending, sent = pending[n:], sent + n
    s.settimeout(10)
    with contextlib.suppress(OSError):
        while len(answer) < 65536 and (more := s.recv(65536)):
            answer += more
    return sent, answer


def _body(total: int, chunked: bool) -> Iterator[bytes]:
    """`total` bytes of spaces (JSON whitespace), as 64 KiB chunks or a plain stream."""
    block = b" " * 65536
    left = total
    while left > 0:
        part = block[: min(left, len(block))]
        left -= len(part)
        yield (b"%x\r\n" % len(part) + part + b"\r\n") if chunked else part
    if chunked:
        yield b"0\r\n\r\n"


def _post_raw(
    st: Stack, path: str, content_type: str, chunked: bool, total: int = BIG
) -> tuple[int, int, dict]:
    """POST a `total`-byte body to `path` over a raw socket; returns (bytes sent, HTTP status,
    the JSON error)."""
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Authorization: Bearer {KEY_A}\r\n{length}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", st.port), timeout=10) as s:
        s.sendall(head.encode())
        sent, answer = _send_until_answered(s, _body(total, chunked), seconds=120)
    head_part, _, rest = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 "), answer[:300]
    if b"transfer-encoding: chunked" in head_part.lower():
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[: int(size, 16)]
    return sent, int(head_part.split()[1]), json.loads(rest)


# Routes that read a body, and two that never do (a chunked body there is never read at all).
ROUTES = ["/v1/jobs", "/v1/webhooks", "/v1/jobs/job_x/cancel", "/v1/no-such-route"]
READS_BODY = {"/v1/jobs", "/v1/webhooks"}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ROUTES)
def test_a_body_over_the_limit_is_refused_before_it_is_read(api: Stack, path: str, chunked: bool) -> None:
    sent, status, body = _post_raw(api, path, "application/json", chunked)
    print(f"{path} {'chunked' if chunked else 'content-length'}: answered after {sent / 1e6:.2f} MB of 50 MB")
    if chunked and path not in READS_BODY:  # answered without reading: nothing parsed either
        assert status == 404 and sent < 10_000_000, (status, body, sent)
        return
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large", body
    assert "SPKD_MAX_BODY_BYTES" in body["error"]["message"] and str(LIMIT) in body["error"]["message"]
    assert set(body["error"]) == {"code", "message", "field"}
    # Refused long before the body ends: a chunked body about when it passed the limit; one with
    # a Content-Length before the server read any of it (what the socket buffers took is all).
    assert sent < 10_000_000, sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_dataset_uploads_keep_their_own_larger_limit(api: Stack, chunked: bool) -> None:
    # Over SPKD_MAX_BODY_BYTES, under SPKD_MAX_UPLOAD_BYTES: read to the end and judged as a zip.
    sent, status, body = _post_raw(api, "/v1/datasets", "application/zip", chunked, total=10 * LIMIT)
    assert status == 422 and body["error"]["code"] == "invalid_archive", body
    # Over SPKD_MAX_UPLOAD_BYTES: refused early, with the upload's code.
    sent, status, body = _post_raw(api, "/v1/datasets", "application/zip", chunked)
    assert status == 413 and body["error"]["code"] == "upload_too_large", body
    assert "SPKD_MAX_UPLOAD_BYTES" in body["error"]["message"]
    assert sent < 10_000_000, sent
    assert list((Path(api.settings.data_root) / "datasets").iterdir()) == []


def test_bodies_within_the_limit_still_work(api: Stack) -> None:
    c = api.client()
    (Path(api.settings.data_root) / "hym").mkdir(parents=True, exist_ok=True)
    spec = tiny_spec({"path": "hym"}, metadata={f"k{i}": "v" * 500 for i in range(30)})  # ~16 kB
    resp = c.post("/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.text
    assert c.get(f"/v1/jobs/{resp.json()['id']}").status_code == 200


def test_the_answer_has_the_json_error_shape_in_process(settings: Settings) -> None:
    s = settings.model_copy(update={"max_body_bytes": 1000})

    def chunks():
        for _ in range(10):
            yield b" " * 500

    with TestClient(create_app(s)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        for resp in (
            c.post("/v1/jobs", content=b" " * 1001, headers={"content-type": "application/json"}),
            c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}),
        ):
            assert resp.status_code == 413, resp.text
            assert resp.headers["content-type"] == "application/json"
            assert resp.json()["error"]["code"] == "payload_too_large"
        ok = c.post("/v1/jobs", content=b" " * 999 + b"1", headers={"content-type": "application/json"})
        assert ok.status_code == 422, ok.text  # within the limit: parsed, and not a spec
