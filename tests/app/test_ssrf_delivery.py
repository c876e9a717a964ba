"""The webhook SSRF guard on IPv6 forms that embed an IPv4 address, through the real API (in-process)
and the real sender (workers/webhooks.py) against a real receiver on loopback and the real Redis:
registration refuses them, a delivery to one stored earlier is refused before connecting, and
the sender's HTTP client itself refuses a socket whose peer is private, whatever URL it is handed."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from spkd.cli import procs
from spkd.core import store, webhook_security, webhook_store
from spkd.core.settings import Settings
from spkd.workers.webhooks import Sender
from tests.helpers import KEY_A, make_settings
from tests.receiver import Receiver, finished

EMBEDDED = [
    "http://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1: on a NAT64 network, loopback
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of the cloud metadata service
    "http://[::ffff:0:127.0.0.1]/",  # IPv4-translated
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://[64:ff9b:1::a9fe:a9fe]/",  # NAT64 local-use
    "http://[2001:0:a9fe:a9fe::1]/",  # Teredo server 169.254.169.254
    "http://[2600:1f18::200:5efe:a9fe:a9fe]/",  # ISATAP under a public prefix
]


@pytest.mark.parametrize("url", EMBEDDED)
def test_registration_refuses_ipv6_forms_of_private_ipv4(client: TestClient, url: str) -> None:
    resp = client.post("/v1/webhooks", json={"url": url})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "webhook_url_not_allowed" and err["field"] == "url", err
    assert "(IPv4 " in err["message"] and "SPKD_WEBHOOKS_ALLOW_PRIVATE" in err["message"], err
    assert client.get("/v1/webhooks").json()["data"] == []


def test_delivery_refuses_embedded_forms_stored_before_the_guard_knew_them(
    tmp_path: Path, redis_url: str
) -> None:
    """Webhooks registered before this guard (stored directly): every attempt is refused by the
    check before connecting, with the stable code; nothing reaches the receiver."""
    s = make_settings(
        tmp_path, redis_url, webhook_max_attempts=2, webhook_backoff_s=0.1, webhook_timeout_s=1.0
    )
    r, keys = store.connect(redis_url), store.Keys(s.redis_prefix)
    try:
        with Receiver() as rx:
            port = rx.server.server_address[1]
            owner = store.owner_of(KEY_A)
            hooks = [
                webhook_store.create_webhook(
                    r, s.redis_prefix, owner, url, ["job.cancelled"], webhook_security.new_secret(), 5
                )
                for url in (
                    f"http://[64:ff9b::7f00:1]:{port}/hook",
                    f"http://[::ffff:0:127.0.0.1]:{port}/hook",
                    f"http://[::ffff:127.0.0.1]:{port}/hook",  # this one does reach 127.0.0.1 here
                )
            ]
            job = store.create_job(r, keys, owner, {"x": 1})
            store.request_cancel(r, keys, job["id"])

            def logs() -> list[dict]:
                return [
                    d for h in hooks for d in webhook_store.list_deliveries(r, s.redis_prefix, h["id"], 10)
                ]

            sender = Sender(s, "t")
            sender.start()
            try:
                procs.wait_until(lambda: len(logs()) == 3 and finished(logs()), 60, "the sender", [])
            finally:
                sender.stop()
            for d in logs():
                assert d["status"] == "failed", d
                errors = [a["error"] for a in d["attempts"]]
                assert errors and all(e.startswith("webhook_url_not_allowed") for e in errors), errors
                assert "(IPv4 127.0.0.1)" in errors[0], errors
            assert rx.received == []
    finally:
        store.delete_prefix(r, s.redis_prefix)


@pytest.mark.parametrize("allow_private", [False, True])
def test_the_senders_client_checks_the_address_each_socket_reaches(
    settings: Settings, allow_private: bool
) -> None:
    """The sender's HTTP client, handed URLs that skip check_url (as a redirect or a name that
    rebinds between the check and the connection would): a private peer is refused at connect,
    before a byte of the delivery is sent, unless SPKD_WEBHOOKS_ALLOW_PRIVATE."""
    s = settings.model_copy(update={"webhooks_allow_private": allow_private, "webhook_timeout_s": 5.0})
    sender = Sender(s, "t")
    try:
        with Receiver() as rx:
            port = rx.server.server_address[1]
            urls = [rx.url, f"http://[::ffff:127.0.0.1]:{port}/hook", f"http://localhost:{port}/hook"]
            for url in urls:
                if allow_private:
                    assert sender.http.post(url, content=b"{}").status_code == 200
                else:
                    with pytest.raises(webhook_security.UrlRefused) as e:
                        sender.http.post(url, content=b"{}")
                    assert e.value.code == "webhook_url_not_allowed", e.value.message
            assert len(rx.received) == (len(urls) if allow_private else 0)
    finally:
        sender.http.close()
        sender.pool.shutdown()
