"""The client's event-stream reader against a real HTTP server that misbehaves."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from spkd.cli.client import ClientError, iter_sse


class _Stream(BaseHTTPRequestHandler):
    """Sends one progress event per connection and closes; `end` only after `ends_after` connects.
    `silent` connections send nothing at all before closing."""

    ends_after: int | None = None
    silent: bool = False
    connects: list[str | None] = []
    # Per connection number (1-based): "error" sends one event then the server's error
    # event with a retry hint; 429 or 503 refuses the stream with Retry-After: 0.
    faults: dict[int, str | int] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.connects.append(self.headers.get("Last-Event-ID"))
        n = len(self.connects)
        fault = self.faults.get(n)
        if isinstance(fault, int):
            body = f'{{"error": {{"code": "too_many_streams", "message": "refused {fault}", "field": null}}}}'
            self.send_response(fault)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if self.silent:
            return
        body = f'id: {n}-0\nevent: progress\ndata: {{"step": {n}}}\n\n'
        if fault == "error":
            error = '{"error": {"code": "store_unavailable", "message": "Redis went away", "field": null}}'
            body += f"retry: 10\nevent: error\ndata: {error}\n\n"
        if self.ends_after is not None and n >= self.ends_after:
            body += f'id: {n}-1\nevent: end\ndata: {{"status": "succeeded"}}\n\n'
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Stream]]]:
    handler = type("Handler", (_Stream,), {"connects": [], "ends_after": None, "silent": False, "faults": {}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_resumes_with_last_event_id_until_end(server: tuple[str, type[_Stream]]) -> None:
    url, handler = server
    handler.ends_after = 3
    with httpx.Client(base_url=url) as c:
        events = list(iter_sse(c, "job_x", backoff_s=0.01))
    assert [e for e, _ in events] == ["progress", "progress", "progress", "end"]
    assert handler.connects == [None, "1-0", "2-0"]


def test_stream_that_closes_without_end_is_an_error_not_a_hang(server: tuple[str, type[_Stream]]) -> None:
    url, handler = server
    handler.silent = True
    # Every connection closes at once with no event: before the cap this reconnected forever.
    with httpx.Client(base_url=url) as c, pytest.raises(ClientError, match="closed before the job ended"):
        for _ in iter_sse(c, "job_x", max_reconnects=3, backoff_s=0.01):
            pass
    assert len(handler.connects) == 4


def test_an_error_event_is_not_yielded_and_the_stream_resumes(server: tuple[str, type[_Stream]]) -> None:
    """The server ends a stream it cannot continue with `retry:` + `event: error`: the follower
    reconnects from the last id instead of handing the error on as a job event (follow() would
    print it as one, or crash on its missing `message`)."""
    url, handler = server
    handler.ends_after, handler.faults = 3, {1: "error", 2: "error"}
    with httpx.Client(base_url=url) as c:
        events = list(iter_sse(c, "job_x", backoff_s=5.0, max_reconnects=1))  # retry: 10 ms, not 5 s
    assert [e for e, _ in events] == ["progress", "progress", "progress", "end"]
    assert handler.connects == [None, "1-0", "2-0"]


def test_429_and_503_are_waited_out_then_the_stream_resumes(server: tuple[str, type[_Stream]]) -> None:
    """Too many open streams for the key, or the store briefly unavailable: the follower waits the
    Retry-After and reconnects with the same Last-Event-ID instead of giving up."""
    url, handler = server
    handler.ends_after, handler.faults = 4, {2: 429, 3: 503}
    with httpx.Client(base_url=url) as c:
        events = list(iter_sse(c, "job_x", backoff_s=0.01))
    assert [e for e, _ in events] == ["progress", "progress", "end"]
    assert handler.connects == [None, "1-0", "1-0", "1-0"]


def test_a_refusal_that_lasts_ends_in_a_client_error(server: tuple[str, type[_Stream]]) -> None:
    url, handler = server
    handler.faults = {n: 429 for n in range(1, 10)}
    with httpx.Client(base_url=url) as c, pytest.raises(ClientError, match="429 too_many_streams"):
        list(iter_sse(c, "job_x", max_reconnects=2))
    assert len(handler.connects) == 3
