"""The wrong-key limiter under real concurrency: a real `spkd serve` on loopback, many threads each
on its own connection, the real Redis. Of a burst of wrong keys from one address exactly
SPKD_AUTH_FAIL_LIMIT get 401 and the rest 429, and valid keys sent in the same burst, and after
it, from the same address, are all served. Plus how clients are counted (client_key) through the
in-process app."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from spkd.app.auth import AuthLimiter, client_key
from spkd.core.settings import Settings
from tests.helpers import KEY_A, KEY_B, Stack, make_stack, running

LIMIT = 20
WRONG = 120  # wrong keys in the burst
RIGHT = 60  # valid keys in the same burst
THREADS = 48


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    # A window far longer than the test: every wrong key of the burst falls in one window.
    st = make_stack(
        tmp_path_factory.mktemp("authlimit"), redis_url, auth_fail_limit=LIMIT, auth_fail_window_s=600
    )
    with running(st):
        st.start_api()
        st.wait_api()
        yield st


def _burst(url: str, keys: list[str]) -> list[tuple[str, int, str]]:
    """GET /v1/jobs once per key, THREADS at a time, each thread on its own connection, all
    released together by a barrier. Returns (key, status, error code)."""
    local = threading.local()
    start = threading.Barrier(THREADS)

    def one(i: int) -> tuple[str, int, str]:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=60)
            start.wait(timeout=60)
        resp = local.c.get("/v1/jobs", headers={"Authorization": f"Bearer {keys[i]}"})
        code = resp.json()["error"]["code"] if resp.status_code >= 400 else ""
        return keys[i], resp.status_code, code

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, range(len(keys))))


def test_exactly_the_limit_of_wrong_keys_pass_and_valid_keys_are_never_refused(api: Stack) -> None:
    wrong = [f"guess-{i:04d}-{'x' * 20}" for i in range(WRONG)]
    right = [KEY_A if i % 2 else KEY_B for i in range(RIGHT)]
    keys = [k for pair in zip(wrong, right + [None] * WRONG, strict=False) for k in pair if k]  # interleaved
    results = _burst(api.url, keys)
    got = Counter((status, code) for key, status, code in results if key.startswith("guess-"))
    served = Counter(status for key, status, _ in results if not key.startswith("guess-"))
    print(f"wrong keys: {dict(got)}; valid keys: {dict(served)}")
    assert got == {(401, "invalid_api_key"): LIMIT, (429, "too_many_auth_failures"): WRONG - LIMIT}, got
    assert served == {200: RIGHT}, served
    # After the burst: the address is locked out for wrong keys only.
    with api.client() as c:
        assert c.get("/v1/jobs").status_code == 200
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 200
        locked = c.get("/v1/jobs", headers={"Authorization": "Bearer still-wrong"})
        assert locked.status_code == 429 and 1 <= int(locked.headers["retry-after"]) <= 600, locked.text
        assert c.get("/v1/jobs", headers={"Authorization": ""}).status_code == 401  # no key: not a guess


def test_clients_are_counted_by_address_and_ipv6_by_its_64() -> None:
    assert client_key("203.0.113.9") == "203.0.113.9"
    assert client_key("::ffff:203.0.113.9") == "203.0.113.9"
    assert (
        client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ffff:ffff:fffe") == "2001:db8:1:2::/64"
    )
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("testclient") == "testclient"


def test_a_client_rotating_through_its_ipv6_64_is_one_client(client, r, keys, settings: Settings) -> None:
    client.app.state.auth_limiter = AuthLimiter(r, keys, settings.model_copy(update={"auth_fail_limit": 4}))
    codes = []
    for i in range(8):
        with TestClient(client.app, client=(f"2001:db8:5:6::{i + 1:x}", 4000)) as c:
            codes.append(c.get("/v1/jobs", headers={"Authorization": f"Bearer wrong-{i}"}).status_code)
    assert codes == [401] * 4 + [429] * 4, codes
    with TestClient(client.app, client=("2001:db8:5:7::1", 4000)) as neighbour:  # the next /64
        assert neighbour.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with TestClient(client.app, client=("2001:db8:5:6::99", 4000)) as same:
        assert same.get("/v1/jobs", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
