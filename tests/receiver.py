"""A real webhook receiver for the tests: a threaded http.server on 127.0.0.1 that checks every
delivery's Standard Webhooks signature with its own implementation (stdlib only, written from the
spec, not from core/webhook_security.py) and answers from a script: a status code per request, or
HANG (read the request, never answer). Also the small API helpers the webhook tests share."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

HANG = "hang"

FAST = {  # short timeouts and backoff so retries and give-ups take seconds
    "webhooks_allow_private": True,  # the receivers are on loopback
    "webhook_timeout_s": 1.0,
    "webhook_backoff_s": 0.2,
    "webhook_max_attempts": 3,
    "webhook_claim_idle_s": 3.0,
}


def verify_standard_webhook(
    secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300
) -> bool:
    """Standard Webhooks 1.0 verification: key = base64-decode(secret without `whsec_`); expected =
    base64(HMAC-SHA256(key, id + "." + timestamp + "." + body)); accept when the timestamp is within
    the tolerance and any space-separated `v1,<sig>` matches in constant time."""
    try:
        msg_id, ts, sigs = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    except KeyError:
        return False
    if not ts.isdigit() or abs(time.time() - int(ts)) > tolerance_s:
        return False
    key = base64.b64decode(secret[len("whsec_") :])
    signed = msg_id.encode() + b"." + ts.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for sig in sigs.split(" "):
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return True
    return False


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int | str

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Start with `with Receiver(script=[500, 500]) as rx:`; after the script, every request gets
    `default`. Set `secret` (from POST /v1/webhooks) before the first delivery arrives."""

    def __init__(self, script: list[int | str] | None = None, default: int | str = 200) -> None:
        self.script, self.default = list(script or []), default
        self.secret = ""
        self.received: list[Received] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with rx._cond:
                    answer = rx.script.pop(0) if rx.script else rx.default
                    ok = verify_standard_webhook(rx.secret, headers, body)
                    rx.received.append(Received(headers, body, ok, answer))
                    rx._cond.notify_all()
                if answer == HANG:
                    rx._closing.wait()  # never answer while the test runs
                    return
                self.send_response(int(answer))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float) -> list[Received]:
        """Until `n` requests arrived (a condition wait, no polling); fails after `timeout` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.received) >= n, timeout):
                raise AssertionError(f"{len(self.received)} of {n} deliveries arrived within {timeout} s")
            return list(self.received)


# ---------------------------------------------------------------- the API side


def register(c: httpx.Client, rx: Receiver, **body: Any) -> dict:
    resp = c.post("/v1/webhooks", json={"url": rx.url, **body})
    assert resp.status_code == 201, resp.text
    hook = resp.json()
    rx.secret = hook["secret"]
    return hook


def wait_log(c: httpx.Client, hook_id: str, done: Callable[[list[dict]], bool], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = c.get(f"/v1/webhooks/{hook_id}/deliveries").json()["data"]
        if done(log):
            return log
        time.sleep(0.2)
    raise AssertionError(f"delivery log of {hook_id} never reached the state: {log}")


def finished(log: list[dict]) -> bool:
    return bool(log) and all(d["status"] != "pending" for d in log)
