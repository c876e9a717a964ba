"""Signed webhooks against real processes: `spkd serve` + a `spkd worker` whose sender delivers to
real HTTP receivers on loopback (tests/receiver.py checks each signature with its own
Standard Webhooks implementation). The worker consumes a queue nobody sends to, so jobs stay
queued and a cancel from the API (a final transition done in the API process) is the event; the
sender still runs in the worker. SSRF and the outbox's crash path are tested in-process against
the real Redis and real receivers.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from spkd.app.main import create_app
from spkd.cli import procs
from spkd.core import store, webhook_outbox, webhook_security, webhook_store
from spkd.core.settings import Settings
from spkd.workers.webhooks import Sender
from tests.helpers import KEY_A, KEY_B, ROOT, SPKD, Stack, make_settings, make_stack, running, tiny_spec
from tests.receiver import FAST, HANG, Receiver, finished, register, verify_standard_webhook, wait_log

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    """The API and one worker that only runs the webhook sender (its job queue gets nothing)."""
    st = make_stack(tmp_path_factory.mktemp("wh"), redis_url, **FAST)
    (st.settings.data_root / "hym").mkdir(parents=True)
    with running(st):
        st.start_api()
        args = [SPKD, "worker", "--name", "whw", "--queue", f"{st.settings.queue}-idle", "--no-preload"]
        st.workers["whw"] = procs.spawn("worker", args, st.log_dir / "worker.log", env=st.env, cwd=st.log_dir)
        st.wait_api()
        r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
        procs.wait_until(lambda: store.live_workers(r, keys, 5), 60, "the worker", list(st.workers.values()))
        yield st


def cancelled_job(c: httpx.Client) -> str:
    """A job created and cancelled while queued: `job.cancelled` from the API process."""
    job = c.post("/v1/jobs", json=tiny_spec({"path": "hym"}))
    assert job.status_code == 201, job.text
    cancel = c.post(f"/v1/jobs/{job.json()['id']}/cancel")
    assert cancel.json()["status"] == "cancelled", cancel.text
    return job.json()["id"]


# ---------------------------------------------------------------- signatures and the API


def readme_verify() -> Callable[..., bool]:
    """The `verify` function of the python block after `<!-- verify-webhook -->` in docs/api.md."""
    page = (ROOT / "docs" / "api.md").read_text()
    assert "<!-- verify-webhook -->" in page, "docs/api.md lost its verify-webhook marker"
    code = page.split("<!-- verify-webhook -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    return namespace["verify"]


def test_signature_matches_the_published_vector() -> None:
    # The Standard Webhooks reference vector (its libraries' tests): same secret, id, time, body.
    secret, msg_id, ts, body = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert (
        webhook_security.sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    fresh = webhook_security.new_secret()
    assert fresh.startswith("whsec_") and len(base64.b64decode(fresh[6:])) == 32
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now)}
    headers["webhook-signature"] = webhook_security.sign(fresh, "msg_1", now, b"{}")
    assert verify_standard_webhook(fresh, headers, b"{}")
    assert not verify_standard_webhook(fresh, headers, b"{ }")  # one byte more: refused


def test_cancelled_job_reaches_its_webhook_signed(stack: Stack) -> None:
    with stack.client() as c, Receiver() as rx, Receiver() as other:
        hook = register(c, rx)
        assert hook["events"] == ["job.succeeded", "job.failed", "job.cancelled"]
        assert hook["secret"].startswith("whsec_")
        failed_only = register(c, other, events=["job.failed"])
        listed = c.get("/v1/webhooks").json()["data"]
        assert {h["id"] for h in listed} == {hook["id"], failed_only["id"]}
        assert all("secret" not in h for h in listed)  # shown once, at creation
        assert "secret" not in c.get(f"/v1/webhooks/{hook['id']}").json()

        job_id = cancelled_job(c)
        [got] = rx.wait_for(1, 60)
        assert got.verified, got.headers
        assert got.headers["content-type"] == "application/json"
        body = got.json
        assert body["type"] == "job.cancelled" and body["timestamp"].endswith("Z")
        assert body["data"] == {
            "id": job_id,
            "status": "cancelled",
            "stage": None,
            "error": None,
            "metrics": None,
        }

        # The docs' receiver snippet (docs/api.md) accepts it too, and refuses it with one byte changed.
        verify = readme_verify()
        assert verify(hook["secret"], got.headers, got.body)
        assert not verify(hook["secret"], got.headers, got.body.replace(b"cancelled", b"succeeded"))

        [entry] = wait_log(c, hook["id"], finished, 30)
        assert entry["status"] == "delivered" and entry["job_id"] == job_id
        assert entry["message_id"] == got.headers["webhook-id"]
        assert [a["status_code"] for a in entry["attempts"]] == [200]
        # The event was fanned out once, atomically, to every webhook: the job.failed-only one got nothing.
        assert c.get(f"/v1/webhooks/{failed_only['id']}/deliveries").json()["data"] == []
        assert other.received == []


def test_receiver_failing_twice_gets_three_attempts(stack: Stack) -> None:
    with stack.client() as c, Receiver(script=[500, 503]) as rx:
        hook = register(c, rx)
        job_id = cancelled_job(c)
        got = rx.wait_for(3, 60)
        assert all(g.verified for g in got)
        assert len({g.headers["webhook-id"] for g in got}) == 1  # one message, retried
        assert len({g.body for g in got}) == 1
        [entry] = wait_log(c, hook["id"], finished, 30)
        assert entry["status"] == "delivered" and entry["job_id"] == job_id
        assert [a["status_code"] for a in entry["attempts"]] == [500, 503, 200]
        assert [a["error"] for a in entry["attempts"]] == ["HTTP 500", "HTTP 503", None]
        times = [a["at"] for a in entry["attempts"]]
        assert times == sorted(times)


def test_receiver_that_never_answers_is_given_up(stack: Stack) -> None:
    with stack.client() as c, Receiver(default=HANG) as hung, Receiver() as rx:
        bad = register(c, hung)
        good = register(c, rx)
        rx.secret = good["secret"]
        job_id = cancelled_job(c)
        [entry] = wait_log(c, bad["id"], finished, 60)
        assert entry["status"] == "failed" and entry["next_attempt_at"] is None
        assert len(entry["attempts"]) == FAST["webhook_max_attempts"]
        assert all(a["status_code"] is None and a["error"].startswith("timeout") for a in entry["attempts"])
        assert len(hung.received) == FAST["webhook_max_attempts"]
        # The other webhook and the job are unaffected.
        [ok] = rx.wait_for(1, 30)
        assert ok.verified and ok.json["data"]["id"] == job_id
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["error"] is None


def test_webhooks_are_per_key(stack: Stack) -> None:
    with stack.client(KEY_A) as a, stack.client(KEY_B) as b, Receiver() as rx_a, Receiver() as rx_b:
        hook_a, hook_b = register(a, rx_a), register(b, rx_b)
        for path in (f"/v1/webhooks/{hook_a['id']}", f"/v1/webhooks/{hook_a['id']}/deliveries"):
            resp = b.get(path)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "webhook_not_found"
        assert b.delete(f"/v1/webhooks/{hook_a['id']}").status_code == 404
        assert [h["id"] for h in b.get("/v1/webhooks").json()["data"]] == [hook_b["id"]]

        job_b = cancelled_job(b)  # B's event is in the outbox before A's
        job_a = cancelled_job(a)
        [got_a] = rx_a.wait_for(1, 60)
        [got_b] = rx_b.wait_for(1, 60)
        assert got_a.verified and got_a.json["data"]["id"] == job_a
        assert got_b.verified and got_b.json["data"]["id"] == job_b
        # Fan-out is per outbox entry, in order: by the time A's event reached A, B's was fanned out.
        assert [d["job_id"] for d in a.get(f"/v1/webhooks/{hook_a['id']}/deliveries").json()["data"]] == [
            job_a
        ]
        assert rx_a.received == [got_a]

        assert b.delete(f"/v1/webhooks/{hook_b['id']}").status_code == 204
        assert b.get(f"/v1/webhooks/{hook_b['id']}").status_code == 404
        assert b.get("/v1/webhooks").json()["data"] == []
        assert a.get(f"/v1/webhooks/{hook_a['id']}").status_code == 200


# ---------------------------------------------------------------- SSRF


REFUSED = [
    "http://127.0.0.1:8080/hook",
    "http://localhost/hook",
    "http://localhost./hook",
    "http://LOCALHOST.:80/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[2002:a9fe:a9fe::1]/",  # 6to4 wrapping 169.254.169.254
    "http://0.0.0.0/",
    "http://2130706433/",  # 127.0.0.1 as one decimal number
    "http://0x7f.1/",
    "http://10.0.0.5/",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://224.0.0.1/",  # multicast
    "http://240.0.0.1/",  # reserved
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "https://user:pw@127.0.0.1/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_registration_refuses_private_targets(client: TestClient, url: str) -> None:
    resp = client.post("/v1/webhooks", json={"url": url})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "webhook_url_not_allowed" and err["field"] == "url"
    assert "SPKD_WEBHOOKS_ALLOW_PRIVATE" in err["message"]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://example.com/x", "invalid_webhook_url"),
        ("file:///etc/passwd", "invalid_webhook_url"),
        ("gopher://127.0.0.1:6379/_INFO", "invalid_webhook_url"),
        ("not a url", "invalid_webhook_url"),
        ("http://no-such-host.invalid/", "webhook_url_unresolvable"),
    ],
)
def test_registration_refuses_other_schemes_and_unknown_hosts(
    client: TestClient, url: str, code: str
) -> None:
    resp = client.post("/v1/webhooks", json={"url": url})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == code, resp.text
    assert client.get("/v1/webhooks").json()["data"] == []


def test_registration_accepts_public_addresses_and_bounds_the_count(settings: Settings) -> None:
    s = settings.model_copy(update={"webhook_max_per_key": 2})
    with TestClient(create_app(s)) as c:
        c.headers["Authorization"] = f"Bearer {KEY_A}"
        for url in ("http://93.184.215.14/hook", "https://[2606:4700:4700::1111]:8443/x"):
            assert c.post("/v1/webhooks", json={"url": url}).status_code == 201
        third = c.post("/v1/webhooks", json={"url": "http://93.184.215.14/other"})
        assert third.status_code == 409 and third.json()["error"]["code"] == "too_many_webhooks"
        bad = c.post("/v1/webhooks", json={"url": "http://93.184.215.14/", "events": ["job.exploded"]})
        assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("events")
        assert len(c.get("/v1/webhooks").json()["data"]) == 2


def _run_sender(settings: Settings, done: Callable[[], bool], timeout: float, name: str = "t") -> None:
    sender = Sender(settings, name)
    sender.start()
    try:
        procs.wait_until(done, timeout, "the sender", [], interval_s=0.1)
    finally:
        sender.stop()


@pytest.mark.parametrize("allow_private", [False, True])
def test_delivery_time_check_refuses_what_dns_now_says_is_private(
    tmp_path: Path, redis_url: str, allow_private: bool
) -> None:
    """A loopback webhook stored directly, as if its name had resolved to a public address at
    registration: the sender checks again before connecting and refuses it, unless allowed."""
    s = make_settings(tmp_path, redis_url, webhook_max_attempts=2, webhook_backoff_s=0.1)
    s = s.model_copy(update={"webhooks_allow_private": allow_private})
    r, keys = store.connect(redis_url), store.Keys(s.redis_prefix)
    try:
        with Receiver() as rx:
            owner = store.owner_of(KEY_A)
            hook = webhook_store.create_webhook(
                r, s.redis_prefix, owner, rx.url, ["job.cancelled"],
                webhook_security.new_secret(), 5,
            )  # fmt: skip
            rx.secret = hook["secret"]
            job = store.create_job(r, keys, owner, {"x": 1})
            store.request_cancel(r, keys, job["id"])

            def log() -> list[dict]:
                return webhook_store.list_deliveries(r, s.redis_prefix, hook["id"], 10)

            _run_sender(s, lambda: finished(log()), 30)
            [entry] = log()
            if allow_private:
                assert entry["status"] == "delivered" and rx.received[0].verified
            else:
                assert entry["status"] == "failed" and rx.received == []
                assert len(entry["attempts"]) == 2
                assert all(a["error"].startswith("webhook_url_not_allowed") for a in entry["attempts"])
    finally:
        store.delete_prefix(r, s.redis_prefix)


# ---------------------------------------------------------------- the outbox


def test_final_transition_writes_the_outbox_in_its_transaction(settings: Settings) -> None:
    r, keys, p = store.connect(settings.redis_url), store.Keys(settings.redis_prefix), settings.redis_prefix
    owner = store.owner_of(KEY_A)
    quiet = store.create_job(r, keys, owner, {"x": 1})
    store.request_cancel(r, keys, quiet["id"])
    assert r.xlen(webhook_outbox.outbox_key(p)) == 0  # no webhook: nothing to send
    webhook_store.create_webhook(r, p, owner, "http://93.184.215.14/", ["job.failed"], "whsec_AAAA", 5)
    job = store.create_job(r, keys, owner, {"x": 1})
    store.transition(r, keys, job["id"], store.RUNNING, [store.QUEUED], stage="distill")
    assert r.xlen(webhook_outbox.outbox_key(p)) == 0  # not a final status
    error = {"code": "internal", "message": "boom", "field": None}
    store.transition(r, keys, job["id"], store.FAILED, [store.RUNNING], error=error)
    [(_, entry)] = r.xrange(webhook_outbox.outbox_key(p))
    assert entry["type"] == "job.failed" and entry["owner"] == owner and entry["job_id"] == job["id"]
    assert json.loads(entry["data"]) == {
        "id": job["id"], "status": "failed", "stage": "distill", "error": error, "metrics": None,
    }  # fmt: skip


def test_entries_a_dead_sender_read_are_taken_over(tmp_path: Path, redis_url: str) -> None:
    """A sender that read an outbox entry and died before fanning it out leaves it pending in the
    consumer group; another sender claims it (XAUTOCLAIM) and delivers it."""
    s = make_settings(tmp_path, redis_url, webhooks_allow_private=True, webhook_claim_idle_s=0.5)
    r, keys, p = store.connect(redis_url), store.Keys(s.redis_prefix), s.redis_prefix
    try:
        with Receiver() as rx:
            owner = store.owner_of(KEY_A)
            hook = webhook_store.create_webhook(
                r, p, owner, rx.url, ["job.cancelled"], webhook_security.new_secret(), 5
            )
            rx.secret = hook["secret"]
            r.xgroup_create(webhook_outbox.outbox_key(p), webhook_store.SENDER_GROUP, id="0", mkstream=True)
            job = store.create_job(r, keys, owner, {"x": 1})
            store.request_cancel(r, keys, job["id"])
            # The "dead" sender: reads the entry, never acknowledges it.
            [(_, [(entry_id, _)])] = r.xreadgroup(
                webhook_store.SENDER_GROUP, "dead", {webhook_outbox.outbox_key(p): ">"}, count=10
            )
            _run_sender(s, lambda: bool(rx.received), 30, name="alive")
            assert rx.received[0].verified and rx.received[0].json["data"]["id"] == job["id"]
            assert r.xpending(webhook_outbox.outbox_key(p), webhook_store.SENDER_GROUP)["pending"] == 0
            assert r.xlen(webhook_outbox.outbox_key(p)) == 0  # acknowledged and deleted
    finally:
        store.delete_prefix(r, p)
