"""Live event streams (GET /v1/jobs/{id}/events as text/event-stream) at scale and under faults,
against a real `spkd serve` on the real Redis (or a private one a test kills): the per-key cap
(429 + Retry-After, a closed stream frees its slot), another key's streams unaffected by one that
holds its maximum, a bounded number of Redis connections whatever the number of streams, and a
stream whose Redis goes away ending with a retry hint, after which the CLI's follower resumes."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from spkd.app.live import CLIENT_NAME, POOL_SIZE
from spkd.cli.client import iter_sse
from spkd.core import store
from tests.helpers import KEY_A, KEY_B, PrivateRedis, Stack

SSE = {"Accept": "text/event-stream"}
WAIT_S = 30.0  # a bound on waiting for a message, never an assertion on how long it took


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Stream:
    """One open SSE response, read message by message ({"event", "data", "id", "retry"})."""

    def __init__(self, resp: httpx.Response) -> None:
        self.resp = resp
        self._lines = resp.aiter_lines()

    async def next(self) -> dict[str, str] | None:
        """The next message (comments skipped), or None once the body ended."""
        msg: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if msg:
                    return msg
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                msg[name] = value.removeprefix(" ")
        return msg or None

    async def until(self, event: str) -> dict[str, str]:
        """Messages up to the first `event` one (which it returns)."""

        async def _read() -> dict[str, str]:
            while True:
                msg = await self.next()
                assert msg is not None, f"the stream ended before an {event!r} event"
                if msg.get("event") == event:
                    return msg

        return await asyncio.wait_for(_read(), WAIT_S)

    async def rest(self) -> list[dict[str, str]]:
        """Every message until the body ends (raises if it is cut instead of ended)."""

        async def _read() -> list[dict[str, str]]:
            out = []
            while (msg := await self.next()) is not None:
                out.append(msg)
            return out

        return await asyncio.wait_for(_read(), WAIT_S)

    async def close(self) -> None:
        await self.resp.aclose()


async def open_stream(c: httpx.AsyncClient, job_id: str, key: str, **headers: str) -> Stream | httpx.Response:
    """A stream (its first message, the retry hint, already read), or the refused response."""
    req = c.build_request("GET", f"/v1/jobs/{job_id}/events", headers={**SSE, **_auth(key), **headers})
    resp = await c.send(req, stream=True)
    if resp.status_code != 200:
        await resp.aread()
        await resp.aclose()
        return resp
    s = Stream(resp)
    first = await asyncio.wait_for(s.next(), WAIT_S)
    assert first == {"retry": "2000"}, first
    return s


def _client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(30.0, read=60.0))


def _api(stack_factory: Callable[..., Stack], redis_url: str, **over: object) -> Stack:
    st = stack_factory(redis_url, **over)
    st.start_api()
    st.wait_api()
    return st


def _jobs(st: Stack, key: str, n: int) -> list[str]:
    r, keys = store.connect(st.settings.redis_url), store.Keys(st.settings.redis_prefix)
    return [store.create_job(r, keys, store.owner_of(key), {"name": f"j{i}"})["id"] for i in range(n)]


def _add_event(st: Stack, job_id: str, message: str) -> str:
    r, keys = store.connect(st.settings.redis_url), store.Keys(st.settings.redis_prefix)
    event_id = store.add_event(r, keys, job_id, "info", message)
    assert event_id
    return event_id


def api_redis_clients(pid: int, redis_url: str) -> list[dict]:
    """CLIENT LIST entries of the connections process `pid` holds to this Redis (its sockets'
    local ports, read from /proc, matched with the addresses Redis sees)."""
    port = urlparse(redis_url).port or 6379
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    local_ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == port:
                local_ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    clients = redis.Redis.from_url(redis_url).client_list()
    return [c for c in clients if int(c["addr"].rsplit(":", 1)[1]) in local_ports]


# ---------------------------------------------------------------- the per-key cap


def test_streams_past_the_key_cap_get_429_and_a_closed_stream_frees_its_slot(stack_factory, redis_url):
    st = _api(stack_factory, redis_url, max_streams_per_key=3)
    (job,) = _jobs(st, KEY_A, 1)

    async def scenario() -> None:
        async with _client(st.url) as c:
            held = [await open_stream(c, job, KEY_A) for _ in range(3)]
            assert all(isinstance(s, Stream) for s in held)
            over = await open_stream(c, job, KEY_A)
            assert isinstance(over, httpx.Response) and over.status_code == 429, over
            assert over.json()["error"]["code"] == "too_many_streams", over.text
            assert "SPKD_MAX_STREAMS_PER_KEY" in over.json()["error"]["message"]
            assert int(over.headers["retry-after"]) >= 1
            # The JSON log is no stream: still answered while the key holds its maximum.
            assert (await c.get(f"/v1/jobs/{job}/events", headers=_auth(KEY_A))).status_code == 200

            # A client closes one stream: its slot is free as soon as the server sees the close
            # (no keep-alive write needed to notice it); exactly one, the next is refused again.
            await held.pop().close()
            again = None
            for _ in range(100):
                again = await open_stream(c, job, KEY_A)
                if isinstance(again, Stream):
                    break
                await asyncio.sleep(0.05)
            assert isinstance(again, Stream), f"the closed stream's slot was not freed: {again}"
            held.append(again)
            refused = await open_stream(c, job, KEY_A)
            assert isinstance(refused, httpx.Response) and refused.status_code == 429

            # A stream the server ends (the job is final) frees its slot as well.
            r, keys = store.connect(st.settings.redis_url), store.Keys(st.settings.redis_prefix)
            store.request_cancel(r, keys, job)  # queued -> cancelled: final
            for s in held:
                msgs = await s.rest()
                assert msgs[-1]["event"] == "end" and '"cancelled"' in msgs[-1]["data"], msgs
                await s.close()
            after_end = None
            for _ in range(100):
                after_end = await open_stream(c, job, KEY_A)
                if isinstance(after_end, Stream):
                    break
                await asyncio.sleep(0.05)
            assert isinstance(after_end, Stream), after_end
            assert (await after_end.until("end"))["data"] == '{"status": "cancelled"}'
            await after_end.close()

    asyncio.run(scenario())
    assert "Traceback" not in st.logs(), st.logs()


def test_another_keys_streams_deliver_while_one_key_holds_its_maximum(stack_factory, redis_url):
    """The tester's case: one key opening more streams than redis-py's pool holds (100) cut every
    other key's streams. Now that key gets 429s past its cap and the others' streams carry on."""
    st = _api(stack_factory, redis_url, max_streams_per_key=100)
    a_jobs, (b_job,) = _jobs(st, KEY_A, 2), _jobs(st, KEY_B, 1)

    async def scenario() -> None:
        async with _client(st.url) as c:
            tries = await asyncio.gather(*(open_stream(c, a_jobs[i % 2], KEY_A) for i in range(110)))
            held = [(a_jobs[i % 2], s) for i, s in enumerate(tries) if isinstance(s, Stream)]
            refused = [s for s in tries if isinstance(s, httpx.Response)]
            assert len(held) == 100 and [s.status_code for s in refused] == [429] * 10

            b_streams = [await open_stream(c, b_job, KEY_B) for _ in range(3)]
            assert all(isinstance(s, Stream) for s in b_streams), b_streams
            event_id = _add_event(st, b_job, "for bob")
            for s in b_streams:
                msg = await s.until("info")
                assert msg["id"] == event_id and "for bob" in msg["data"]
            # Progress (a field of the job, not an event) reaches them too, from the reader's poll.
            r, keys = store.connect(st.settings.redis_url), store.Keys(st.settings.redis_prefix)
            store.update_job(
                r, keys, b_job, progress={"stage": "distill", "epoch": 1, "epochs": 2, "step": 7}
            )
            for s in b_streams:
                assert '"step": 7' in (await s.until("progress"))["data"]
            # ...and key A's streams are live too (one reader serves them all).
            a_event = _add_event(st, a_jobs[0], "for alice")
            got = await asyncio.gather(*(s.until("info") for job, s in held if job == a_jobs[0]))
            assert len(got) >= 40 and {m["id"] for m in got} == {a_event}
            for s in [*(s for _, s in held), *b_streams]:
                await s.close()

    asyncio.run(scenario())
    logs = st.logs()
    assert "Traceback" not in logs and "MaxConnectionsError" not in logs, logs


# ---------------------------------------------------------------- bounded Redis connections


def test_redis_connections_of_the_api_do_not_grow_with_its_streams(stack_factory, redis_url):
    st = _api(stack_factory, redis_url, max_streams_per_key=100)
    jobs = _jobs(st, KEY_A, 6)
    assert st.api is not None

    async def scenario() -> list[dict]:
        async with _client(st.url) as c:
            streams = []
            for i in range(60):
                s = await open_stream(c, jobs[i % 6], KEY_A)
                assert isinstance(s, Stream), s
                streams.append(s)
            ids = {job: _add_event(st, job, f"live {job}") for job in jobs}
            for i, s in enumerate(streams):  # every stream is live: it gets its job's new event
                assert (await s.until("info"))["id"] == ids[jobs[i % 6]]
            clients = api_redis_clients(st.api.pid, redis_url)
            for s in streams:
                await s.close()
            return clients

    clients = asyncio.run(scenario())
    # 60 streams held: the API's connections are the streaming reader plus its small pool, and
    # the handful of the synchronous client its routes use in threads; none is held per stream.
    assert len(clients) <= 1 + POOL_SIZE + 8, [(c.get("name"), c.get("cmd")) for c in clients]
    assert len([c for c in clients if c.get("cmd") == "xread"]) <= 1, clients  # one blocking reader
    named = [c for c in clients if c.get("name") == CLIENT_NAME]
    assert 1 <= len(named) <= 1 + POOL_SIZE, named


# ---------------------------------------------------------------- Redis goes away


def test_a_stream_whose_redis_goes_away_ends_with_a_retry_hint_then_resumes(stack_factory, private_redis):
    pr: PrivateRedis = private_redis
    st = _api(stack_factory, pr.url)
    (job,) = _jobs(st, KEY_A, 1)
    first = _add_event(st, job, "before the outage")

    async def scenario() -> None:
        async with _client(st.url) as c:
            s = await open_stream(c, job, KEY_A)
            assert isinstance(s, Stream)
            assert (await s.until("info"))["id"] == first
            pr.kill()
            msgs = await s.rest()  # ends, not cut: httpx raises on a body cut mid-way
            await s.close()
            assert msgs, "the stream ended without a last message"
            last = msgs[-1]
            assert last["event"] == "error" and int(last["retry"]) > 0, msgs
            assert '"code": "store_unavailable"' in last["data"], last

            pr.start()  # same port and folder: the AOF brings the job back
            later = _add_event(st, job, "after the outage")
            resumed = await open_stream(c, job, KEY_A, **{"Last-Event-ID": first})
            assert isinstance(resumed, Stream), resumed.text
            msg = await resumed.until("info")
            assert msg["id"] == later and "after the outage" in msg["data"]  # not replayed: resumed
            await resumed.close()

    asyncio.run(scenario())
    logs = st.logs()
    assert "Traceback" not in logs, logs


def test_the_cli_follower_resumes_across_a_redis_restart(stack_factory, private_redis):
    """`spkd events --follow` / `submit --wait` read `iter_sse`: through an outage (error event,
    then 503s while Redis is down) it reconnects with Last-Event-ID and yields each event once."""
    pr: PrivateRedis = private_redis
    st = _api(stack_factory, pr.url)
    (job,) = _jobs(st, KEY_A, 1)
    got: list[tuple[str, dict]] = []
    failed: list[BaseException] = []
    seen_first = threading.Event()

    def follow() -> None:
        try:
            with httpx.Client(base_url=st.url, headers=_auth(KEY_A)) as c:
                for event, data in iter_sse(c, job, max_reconnects=20, backoff_s=0.2):
                    got.append((event, data))
                    if event == "info":
                        seen_first.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failed.append(e)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    _add_event(st, job, "one")
    assert seen_first.wait(WAIT_S), (got, failed)
    pr.kill()
    pr.start()
    _add_event(st, job, "two")
    r, keys = store.connect(pr.url), store.Keys(st.settings.redis_prefix)
    store.request_cancel(r, keys, job)
    t.join(WAIT_S * 2)
    assert not t.is_alive() and not failed, (got, failed)
    kinds = [(e, d.get("message")) for e, d in got]
    assert kinds == [
        ("status", "job queued"),
        ("info", "one"),
        ("info", "two"),
        ("status", "cancelled before it started"),
        ("end", None),
    ], kinds
    assert got[-1][1] == {"status": "cancelled"}
