"""RedisReporter: the engine's Reporter protocol written to the job store, plus the Monitor thread
that renews the execution lease, polls the cancel and pause flags and enforces the hard stop.

Every write carries the attempt's fencing token (store.Lease.fence): once another attempt took
the job over, the next write raises Fenced, which the engine does not catch, and the process
stops without changing anything more."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from spkd.common.reporter import Fenced, Progress
from spkd.core import store, webhook_outbox

log = logging.getLogger("spkd.worker")
# Redis unreachable (restart, network blip): worth waiting out, unlike a bug in a command.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


class Monitor(threading.Thread):
    """Every `poll_s`: re-read the cancel and pause flags (cached for should_stop), renew the lease
    every ttl/3. If the engine has not stopped `hard_stop_s` after a cancel (or a pause), end the
    job as cancelled (paused: it resumes from its last checkpoint) and kill this process: the
    prefork parent replaces the child and, with task_reject_on_worker_lost, the redelivered
    message finds the job final (or paused) and is dropped. A cancel seen after a pause wins."""

    def __init__(
        self,
        r: redis.Redis,
        keys: store.Keys,
        job_id: str,
        lease: store.Lease,
        poll_s: float,
        hard_stop_s: float,
    ) -> None:
        super().__init__(name=f"monitor-{job_id}", daemon=True)
        self.r, self.keys, self.job_id, self.lease = r, keys, job_id, lease
        self.poll_s, self.hard_stop_s = poll_s, hard_stop_s
        self.cancel_seen_at: float | None = None
        self.pause_seen_at: float | None = None
        self.lease_lost = False
        # Training steps run since the last saved resume point (RedisReporter counts them): what a
        # resume after a pause redoes, since checkpoints are taken at epoch ends.
        self.steps_since_save = 0
        self._done = threading.Event()

    @property
    def stop_requested(self) -> bool:
        return self.cancel_seen_at is not None or self.pause_seen_at is not None or self.lease_lost

    def run(self) -> None:
        renew_every = max(self.lease.ttl_ms / 3000, self.poll_s)
        last_renew = time.monotonic()
        while not self._done.wait(self.poll_s):
            try:
                if self.cancel_seen_at is None:
                    cancel, pause = store.stop_flags(self.r, self.keys, self.job_id)
                    if cancel:
                        self.cancel_seen_at = time.monotonic()
                        log.info("job %s: cancel requested", self.job_id)
                    elif pause and self.pause_seen_at is None:
                        self.pause_seen_at = time.monotonic()
                        log.info("job %s: pause requested", self.job_id)
                if time.monotonic() - last_renew >= renew_every:
                    # Retried every poll while Redis is unreachable (renew raises, last_renew stays):
                    # once it is back, a lease that expired meanwhile is noticed within poll_s,
                    # before an orphan requeue can start this job on another worker.
                    renewed = self.lease.renew()
                    last_renew = time.monotonic()
                    if not renewed:
                        log.error("job %s: execution lease lost; stopping", self.job_id)
                        self.lease_lost = True
            except redis.RedisError as e:  # keep going: a short Redis blip must not kill a long job
                log.warning("job %s: monitor could not reach Redis: %s", self.job_id, e)
            seen = self.cancel_seen_at if self.cancel_seen_at is not None else self.pause_seen_at
            if seen is not None and time.monotonic() - seen > self.hard_stop_s:
                self._hard_stop()

    def _hard_stop(self) -> None:
        what = "cancel" if self.cancel_seen_at is not None else "pause"
        log.error(
            "job %s: engine did not stop %.0f s after the %s request; terminating the process",
            self.job_id,
            self.hard_stop_s,
            what,
        )
        late = f"hard stop: the engine did not stop within {self.hard_stop_s:.0f} s"
        allowed = [store.VALIDATING, store.RUNNING]
        try:
            try:
                if what == "pause":
                    store.transition(
                        self.r,
                        self.keys,
                        self.job_id,
                        store.PAUSED,
                        allowed,
                        f"paused ({late}); a resume continues from the last checkpoint and redoes the "
                        f"{self.steps_since_save} training step(s) run since it",
                        {"steps_redone": self.steps_since_save, "stopped": late},
                        fence=self.lease.fence,
                    )
                    self.lease.release()
                    return
            except store.CancelPending:  # cancelled meanwhile: cancel wins
                pass
            store.transition(
                self.r,
                self.keys,
                self.job_id,
                store.CANCELLED,
                allowed,
                f"cancelled ({late})",
                fence=self.lease.fence,
            )
            self.lease.release()
        finally:
            os._exit(75)

    def finish(self) -> None:
        self._done.set()


# Events the engine writes right after saving a resume point (models/stages/common.py: epoch-end
# checkpoint; models/pipeline.py: a finished stage; models/stages/search.py: a scored candidate).
SAVED_EVENTS = frozenset({"checkpoint", "stage_finished", "search"})


class RedisReporter:
    """Events go to the job's stream at once (they are rare); per-step progress is throttled to one
    write per `interval_s`, plus every epoch end, so a fast loop does not hammer Redis.

    A Redis outage does not end the job: progress writes are skipped while it lasts and events
    wait up to `outage_s` for Redis to come back (longer, and the lease is gone anyway)."""

    def __init__(
        self,
        r: redis.Redis,
        keys: store.Keys,
        job_id: str,
        monitor: Monitor,
        interval_s: float = 0.5,
        outage_s: float = 30.0,
        on_checkpoint: Callable[[], Any] | None = None,
    ) -> None:
        self.r, self.keys, self.job_id, self.monitor = r, keys, job_id, monitor
        # Runs before a `checkpoint` event is written (core.bucket.CheckpointPublisher: the event
        # then means "saved and published"); what it raises ends the run.
        self.on_checkpoint = on_checkpoint
        self.interval_s, self.outage_s = interval_s, outage_s
        self._last_write = 0.0
        self._latest: Progress | None = None

    @property
    def fence(self) -> int | None:
        return self.monitor.lease.fence

    def _waiting_out_outages(self, what: str, write: Any) -> Any:
        deadline = time.monotonic() + self.outage_s
        while True:
            try:
                return write()
            except TRANSIENT as e:
                if time.monotonic() >= deadline or self.monitor.lease_lost:
                    raise
                log.warning("job %s: Redis unreachable (%s); holding the %s", self.job_id, e, what)
                time.sleep(1.0)

    def event(self, kind: str, message: str, **data: Any) -> None:
        if kind == "checkpoint" and self.on_checkpoint is not None:
            t0 = time.monotonic()
            self.on_checkpoint()
            data["published_s"] = round(time.monotonic() - t0, 3)
        self._waiting_out_outages(
            f"{kind} event",
            lambda: store.add_event(self.r, self.keys, self.job_id, kind, message, fence=self.fence, **data),
        )
        if kind in SAVED_EVENTS:
            self.monitor.steps_since_save = 0
        if kind == "stage_started" and data.get("stage"):
            self._update(stage=data["stage"])
        elif kind == "epoch_end" and self._latest is not None:
            self._write(self._latest)
        elif kind == "stage_finished":
            webhook_outbox.add_stage_finished(self.r, self.keys.prefix, self.job_id, data)

    def _update(self, **fields: Any) -> None:
        try:
            store.update_job(self.r, self.keys, self.job_id, fence=self.fence, **fields)
        except TRANSIENT as e:  # progress is rewritten at the next step; never stop training for it
            log.warning("job %s: progress not written (Redis unreachable: %s)", self.job_id, e)

    def progress(self, progress: Progress) -> None:
        self.monitor.steps_since_save += 1  # the engine reports once per training step
        self._latest = progress
        if time.monotonic() - self._last_write >= self.interval_s or progress.step == progress.steps:
            self._write(progress)

    def _write(self, p: Progress) -> None:
        self._last_write = time.monotonic()
        body = {
            "stage": p.stage,
            "epoch": p.epoch,
            "epochs": p.epochs,
            "step": p.step,
            "steps": p.steps,
            "images_per_sec": round(p.images_per_sec, 2),
            "eta_s": p.eta_s,
            "loss": p.loss,
            "updated_at": time.time(),
        }
        self._update(progress=body, stage=p.stage)

    def should_stop(self) -> bool:
        return self.monitor.stop_requested

    def ensure_current(self) -> None:
        """Raise Fenced unless this attempt still owns the job: its lease was not lost and its
        fencing token is still the job's (the engine calls this right before publishing a file)."""
        if self.monitor.lease_lost:
            raise Fenced(f"job {self.job_id}: execution lease lost")
        self._waiting_out_outages(
            "fencing check", lambda: store.check_fence(self.r, self.keys, self.job_id, self.fence)
        )
