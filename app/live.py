"""Live job events for every server-sent-event stream of one API process, over a bounded number of
Redis connections (docs/architecture.md#8-live-events-in-the-api).

One `Live` per API process (started in the app's lifespan) owns:

- one *reader* connection and one asyncio task that XREAD BLOCKs over the event streams of every
  job that has subscribers, and once a second reads those jobs' status and progress in one
  pipeline; what it reads is formatted once and handed to every subscriber of that job;
- a small blocking pool (`POOL_SIZE` connections) for each new stream's catch-up read (its job's
  status, progress and the events after its cursor) and for waking the reader.

So a process uses at most 1 + POOL_SIZE Redis connections for streaming, whatever the number of
clients. The number of open streams per API key is capped per process
(`SPKD_MAX_STREAMS_PER_KEY`: past it `open` raises a 429 `too_many_streams`). Any failure ends
the affected streams with an `error` event and a `retry:` hint (never a cut body): the client
reconnects with Last-Event-ID and misses nothing. The messages themselves are app/sse.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from spkd.app.errors import ApiError
from spkd.app.sse import (
    RETRY_MS,
    Frame,
    end_frame,
    entry_order,
    error_frame,
    event_frame,
    progress_frame,
    store_down_frame,
)
from spkd.core import store
from spkd.core.settings import Settings

log = logging.getLogger("spkd.api")

CLIENT_NAME = "spkd-api-live"  # every streaming connection says so in CLIENT LIST
POOL_SIZE = 4  # catch-up reads and wake-ups; the reader has its own connection
POLL_S = 1.0  # status/progress of the followed jobs, read once per this, for all of them
BATCH = 500  # entries per stream per XREAD, and per page of a catch-up XRANGE
KEEPALIVE_S = 15.0  # a comment on a quiet stream, so clients and proxies see it is alive
STOP_WAIT_S = 1.0  # how long stop() waits for the reader after each cancel
MAX_BACKLOG = 2000  # frames waiting for a slow client; past it the stream ends (it resumes)
STREAM_RETRY_AFTER_S = 5  # Retry-After of the 429 once a key holds its maximum of streams
_BACKOFF_S = (0.5, 5.0)  # the reader's wait after a failure, doubled up to the maximum


@dataclass(eq=False)
class Subscriber:
    """One open stream: who holds it, its job, its cursor (the last event id it sent) and the
    frames the reader handed it that it has not sent yet."""

    owner: str
    job_id: str
    last: str
    sent_progress: str | None = None
    frames: deque[Frame] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def push(self, frame: Frame) -> None:
        if self.closed:
            return
        if len(self.frames) >= MAX_BACKLOG and not frame.last:
            self.frames.clear()
            frame = error_frame(
                "stream_lagging",
                f"this client read too slowly ({MAX_BACKLOG} messages waiting); reconnect with Last-Event-ID",
            )
        self.frames.append(frame)
        self.wake.set()


@dataclass(eq=False)
class _Job:
    """A followed job: its subscribers, the reader's cursor in its event stream (None until the
    first subscriber has read where the stream ends) and the last progress handed out."""

    key: str
    subs: set[Subscriber] = field(default_factory=set)
    cursor: str | None = None
    progress: str | None = None
    starting: asyncio.Event | None = None  # set while its first subscriber reads the stream's end

    def push(self, frame: Frame) -> None:
        for sub in list(self.subs):
            sub.push(frame)
            if sub.frames and sub.frames[-1].last:
                self.subs.discard(sub)  # ended (lagging or final): nothing more for it


class Live:
    """The fan-out of one API process; `start()`/`stop()` in the app's lifespan, `open()` per
    stream request. See the module docstring."""

    def __init__(self, settings: Settings, keys: store.Keys) -> None:
        self.settings, self.keys = settings, keys
        opts: dict[str, Any] = dict(
            decode_responses=True, client_name=CLIENT_NAME, socket_connect_timeout=2, socket_timeout=10
        )
        # The reader: one connection, used by one task only. It retries nothing by itself: a
        # failure ends its streams at once (with a retry hint) and the loop reconnects, instead of
        # leaving clients waiting on hidden retries.
        reader = aredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=1, timeout=5, retry=Retry(NoBackoff(), 0), **opts
        )
        self._reader = aredis.Redis(connection_pool=reader)
        # The pool's short commands retry twice on a fresh connection (one left over from before a
        # Redis restart fails once); a free connection is waited for up to 5 s.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        pool = aredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=POOL_SIZE, timeout=5, retry=retry, **opts
        )
        self._pool = aredis.Redis(connection_pool=pool)
        self._jobs: dict[str, _Job] = {}
        self._open: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._reader_id: int | None = None
        self._blocked = self._unblocking = False  # the reader waits in XREAD; a wake-up is on its way
        self._task: asyncio.Task[None] | None = None
        # Set by stop(): the reader loops end on it. A cancel alone can be swallowed by a library
        # await (redis-py's client_id) and then turned into TimeoutError by asyncio.timeout.
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the reader task (on the running event loop: the server's)."""
        self._task = asyncio.create_task(self._run(), name="spkd-live-reader")

    async def stop(self) -> None:
        """End every open stream (with a retry hint: another API process can serve it), stop the
        reader and close the connections."""
        for job in list(self._jobs.values()):
            job.push(
                error_frame("server_stopping", "this API process is stopping; reconnect with Last-Event-ID")
            )
        self._jobs.clear()
        self._stopping = True
        self._wake.set()
        for _ in range(3):  # bounded: shutdown must never hang on the reader
            if self._task is None or self._task.done():
                break
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_WAIT_S)
        else:
            log.warning(
                "live events: the reader did not stop within %.0f s; closing its connections", 3 * STOP_WAIT_S
            )
        await self._reader.aclose(close_connection_pool=True)
        await self._pool.aclose(close_connection_pool=True)

    # ------------------------------------------------------------ streams

    def open(self, owner: str, job_id: str, last: str) -> Subscriber:
        """Take one of `owner`'s stream slots for a stream of `job_id` from after `last` (an event
        id, "0-0" for all). Raises ApiError 429 `too_many_streams` (with Retry-After) when the key
        already holds SPKD_MAX_STREAMS_PER_KEY streams on this process. Give the slot back with
        `close` (EventStreamResponse does, however the stream ends)."""
        cap = self.settings.max_streams_per_key
        if self._open[owner] >= cap:
            raise ApiError(
                429,
                "too_many_streams",
                f"this API key already holds {cap} open event streams on this server "
                "(SPKD_MAX_STREAMS_PER_KEY); close one, or page the log with GET "
                "/v1/jobs/{id}/events?after=<last id> instead",
                headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
            )
        self._open[owner] += 1
        return Subscriber(owner, job_id, last)

    def close(self, sub: Subscriber) -> None:
        """Give the stream's slot back and stop handing it frames (idempotent)."""
        if sub.closed:
            return
        sub.closed = True
        self._open[sub.owner] -= 1
        if self._open[sub.owner] <= 0:
            del self._open[sub.owner]
        job = self._jobs.get(sub.job_id)
        if job is not None:
            job.subs.discard(sub)
            if not job.subs and job.starting is None:
                del self._jobs[sub.job_id]  # nobody follows it: the reader stops reading it

    async def stream(self, sub: Subscriber) -> AsyncIterator[str]:
        """The SSE body of one stream: `retry:`, the events after its cursor, then live events and
        progress as the reader hands them out, and `end` once the job is final. Any error ends it
        with an `error` event and a retry hint; a keep-alive comment every KEEPALIVE_S when quiet."""
        yield f"retry: {RETRY_MS}\n\n"
        try:
            async for text in self._catch_up(sub):
                yield text
            while not sub.closed:
                if not sub.frames:
                    sub.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(KEEPALIVE_S):  # a timer, not a task per wait
                            await sub.wake.wait()
                    if not sub.frames:
                        yield ": keep-alive\n\n"
                        continue
                # Everything waiting goes out as one chunk: one write per wake-up, however many
                # events arrived meanwhile (a busy job followed by many clients).
                texts, last = [], False
                while sub.frames and not last:
                    frame = sub.frames.popleft()
                    last = frame.last
                    if text := self._accept(sub, frame):
                        texts.append(text)
                if texts:
                    yield "".join(texts)
                if last:
                    return
        except (redis.RedisError, OSError) as exc:
            log.info(
                "event stream of %s: job store unavailable (%s: %s)", sub.job_id, type(exc).__name__, exc
            )
            yield store_down_frame(exc).text
        except Exception as exc:  # noqa: BLE001 - whatever it is, the client gets a last message
            log.warning("event stream of %s failed: %s: %s", sub.job_id, type(exc).__name__, exc)
            yield error_frame(
                "stream_failed", "the event stream failed on the server; reconnect with Last-Event-ID"
            ).text
        finally:
            self.close(sub)

    def _accept(self, sub: Subscriber, frame: Frame) -> str | None:
        """The frame's text unless the stream already sent it (an event at or before its cursor,
        the same progress again); moves the cursor."""
        if frame.event_id is not None:
            if entry_order(frame.event_id) <= entry_order(sub.last):
                return None
            sub.last = frame.event_id
        if frame.progress is not None:
            if frame.progress == sub.sent_progress:
                return None
            sub.sent_progress = frame.progress
        return frame.text

    async def _catch_up(self, sub: Subscriber) -> AsyncIterator[str]:
        """Join the job's subscribers, then read its status, progress and the events after the
        cursor (status first: a final status is written with its event, so events read after it
        include the last one). The reader hands this subscriber everything after the point where
        it starts reading the job, which is never past the end of this read (the first subscriber
        of a job reads that point itself, later ones wait for it)."""
        while True:
            job = self._jobs.get(sub.job_id)
            if job is None:
                job = self._jobs[sub.job_id] = _Job(self.keys.events(sub.job_id))
            if job.cursor is not None or job.starting is None:
                break
            await job.starting.wait()  # another stream is reading where the job's log ends
        job.subs.add(sub)
        first = job.cursor is None
        if first:
            job.starting = asyncio.Event()
        try:
            pipe = self._pool.pipeline(transaction=False)
            pipe.hmget(self.keys.job(sub.job_id), "status", "progress")
            if first:
                pipe.xrevrange(job.key, "+", "-", count=1)
            pipe.xrange(job.key, f"({sub.last}", "+", count=BATCH)
            replies = await pipe.execute()
        finally:
            if first:
                starting, job.starting = job.starting, None
                if starting is not None:
                    starting.set()
        (status, progress), page = replies[0], replies[-1]
        if first:
            tail = replies[1]
            job.cursor = tail[0][0] if tail else "0-0"
            await self._wake_reader()
        if status is None:  # deleted since the request checked it
            sub.frames.append(error_frame("job_not_found", f"job {sub.job_id} no longer exists (deleted)"))
            return
        while True:
            texts = []
            for entry_id, fields in page:
                frame = event_frame(entry_id, fields)
                if frame and (text := self._accept(sub, frame)):
                    texts.append(text)
            if texts:
                yield "".join(texts)  # one chunk per page
            if len(page) < BATCH:
                break
            page = await self._pool.xrange(job.key, f"({sub.last}", "+", count=BATCH)
        frame = progress_frame(progress) if progress else None
        if frame and (text := self._accept(sub, frame)):
            yield text
        if status in store.FINAL:
            sub.frames.append(end_frame(status))  # after whatever the reader handed it already

    async def _wake_reader(self) -> None:
        """A job was added: let the reader's XREAD include it now rather than after its block
        (one CLIENT UNBLOCK per blocked XREAD, however many jobs are added meanwhile)."""
        self._wake.set()
        if self._reader_id is not None and self._blocked and not self._unblocking:
            self._unblocking = True
            with contextlib.suppress(redis.RedisError, OSError):
                await self._pool.client_unblock(self._reader_id)

    # ------------------------------------------------------------ the reader

    async def _run(self) -> None:
        delay = _BACKOFF_S[0]
        down = False
        while not self._stopping:
            try:
                self._reader_id = None
                self._reader_id = await self._reader.client_id()
                if down:
                    log.warning("live events: the job store answers again")
                    down, delay = False, _BACKOFF_S[0]
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis gone or anything else: streams end cleanly
                if self._stopping:
                    return
                if not down:
                    log.warning(
                        "live events: reading the job store failed (%s: %s); open streams end with a "
                        "retry hint, retrying",
                        type(exc).__name__,
                        exc,
                    )
                down = True
                frame = (
                    store_down_frame(exc)
                    if isinstance(exc, (redis.RedisError, OSError))
                    else error_frame(
                        "stream_failed", "the event stream failed on the server; reconnect with Last-Event-ID"
                    )
                )
                for job in list(self._jobs.values()):
                    job.push(frame)
                    job.subs.clear()
                self._jobs = {k: j for k, j in self._jobs.items() if j.starting is not None}
                with contextlib.suppress(Exception):
                    await self._reader.connection_pool.disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_S[1])

    async def _read_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = 0.0
        while not self._stopping:
            streams = {j.key: j.cursor for j in self._jobs.values() if j.cursor is not None}
            if not streams:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await self._wake.wait()
                continue
            wait_ms = int((next_poll - loop.time()) * 1000)
            if wait_ms > 0:
                self._wake.clear()
                self._blocked, self._unblocking = True, False
                try:
                    reply = await self._reader.xread(streams, count=BATCH, block=wait_ms)
                finally:
                    self._blocked = False
                self._hand_out(reply or [])
            if loop.time() >= next_poll:
                await self._poll()
                next_poll = loop.time() + POLL_S

    def _job_of(self, key: str) -> tuple[str, _Job] | None:
        job_id = key.removeprefix(self.keys.events(""))
        job = self._jobs.get(job_id)
        return (job_id, job) if job is not None and job.key == key else None

    def _hand_out(self, reply: Any) -> None:
        for key, entries in reply:
            found = self._job_of(key)
            if found is None or not entries:
                continue
            job = found[1]
            for entry_id, fields in entries:
                if frame := event_frame(entry_id, fields):
                    job.push(frame)
            if job.cursor is None or entry_order(entries[-1][0]) > entry_order(job.cursor):
                job.cursor = entries[-1][0]

    async def _poll(self) -> None:
        """Status and progress of every followed job in one pipeline: progress to its subscribers
        when it changed; a final job gets its remaining events, then `end`, and is dropped."""
        jobs = [(job_id, j) for job_id, j in self._jobs.items() if j.cursor is not None]
        if not jobs:
            return
        pipe = self._reader.pipeline(transaction=False)
        for job_id, _ in jobs:
            pipe.hmget(self.keys.job(job_id), "status", "progress")
        replies = await pipe.execute()
        for (job_id, job), (status, progress) in zip(jobs, replies, strict=True):
            if self._jobs.get(job_id) is not job:
                continue  # dropped (no subscribers left) meanwhile
            if status is None:
                job.push(error_frame("job_not_found", f"job {job_id} no longer exists (deleted)"))
                self._drop(job_id, job)
                continue
            if status in store.FINAL:
                while True:  # status first, events second: its final event is already there
                    page = await self._reader.xrange(job.key, f"({job.cursor}", "+", count=BATCH)
                    self._hand_out([(job.key, page)])
                    if len(page) < BATCH:
                        break
            if progress and progress != job.progress:
                job.progress = progress
                if frame := progress_frame(progress):
                    job.push(frame)
            if status in store.FINAL:
                job.push(end_frame(status))
                self._drop(job_id, job)

    def _drop(self, job_id: str, job: _Job) -> None:
        job.subs.clear()
        if self._jobs.get(job_id) is job and job.starting is None:
            del self._jobs[job_id]


class EventStreamResponse(StreamingResponse):
    """The SSE response of one subscriber: streams `Live.stream`, stops as soon as the client
    disconnects (whatever the server's ASGI version), and always gives the stream's slot back,
    even when the body never started."""

    def __init__(self, live: Live, sub: Subscriber) -> None:
        super().__init__(
            live.stream(sub),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._live, self._sub = live, sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def body() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._live.close(self._sub)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
