"""The client's event-stream reader against a real HTTP server that misbehaves."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cli.client import ClientError, iter_sse


class _Stream(BaseHTTPRequestHandler):
    """Sends one progress event per connection and closes; `end` only after `ends_after` connects.
    `silent` connections send nothing at all before closing."""

    ends_after: int | None = None
    silent: bool = False
    connects: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.connects.append(self.headers.get("Last-Event-ID"))
        n = len(self.connects)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if self.silent:
            return
        body = f'id: {n}-0\nevent: progress\ndata: {{"step": {n}}}\n\n'
        if self.ends_after is not None and n >= self.ends_after:
            body += f'id: {n}-1\nevent: end\ndata: {{"status": "succeeded"}}\n\n'
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Stream]]]:
    handler = type("Handler", (_Stream,), {"connects": [], "ends_after": None, "silent": False})
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
