"""How the engine reports: events, progress and a "should I stop?" check. Torch-free.

The same engine runs under Celery (workers/ implements this against the Redis store), under the
local CLI (a rich progress bar) and in tests (a recorder), so it only ever talks to this protocol.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class StopRequested(Exception):
    """Raised inside the engine when `Reporter.should_stop()` turns true; the run ends cleanly."""


class Fenced(BaseException):
    """This run no longer owns its job: another attempt took it over (or the lease was lost).

    Raised by a Reporter (any write refused, or `ensure_current`). The process must stop at once
    and change nothing more: no file published, no status written, the job not marked failed.
    A BaseException on purpose, like SystemExit: an `except Exception` anywhere in the engine
    (ONNX exporter fallback, OOM retry) must never swallow it and carry on writing.
    """


@dataclass(frozen=True)
class Progress:
    stage: str  # one of common.spec.STAGES
    epoch: int  # 1-based, within the stage
    epochs: int
    step: int  # 1-based, within the epoch
    steps: int
    images_per_sec: float
    eta_s: float | None  # whole run remaining, best estimate
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reporter(Protocol):
    def event(self, kind: str, message: str, **data: Any) -> None:
        """A line for the job's event log, e.g. kind='stage_started', 'epoch_end', 'warning'."""

    def progress(self, progress: Progress) -> None:
        """Called every step (cheap: implementations throttle their own writes)."""

    def should_stop(self) -> bool:
        """Checked every training step; True means cancel as soon as possible."""

    def ensure_current(self) -> None:
        """Optional. Called right before the engine publishes a file (checkpoint, stage weights,
        artifacts); raises Fenced when this run may no longer write. `ensure_current(reporter)`
        calls it where a reporter has it."""


def ensure_current(reporter: Reporter) -> None:
    """Ask the reporter whether this run still owns its output (reporters without the hook: yes)."""
    check = getattr(reporter, "ensure_current", None)
    if check is not None:
        check()


class NullReporter:
    def event(self, kind: str, message: str, **data: Any) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class RecordingReporter:
    """Keeps everything in memory; tests read it, `stop_after_steps` simulates a cancel."""

    def __init__(self, stop_after_steps: int | None = None) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.progresses: list[Progress] = []
        self._stop_after = stop_after_steps

    def event(self, kind: str, message: str, **data: Any) -> None:
        self.events.append((kind, message, data))

    def progress(self, progress: Progress) -> None:
        self.progresses.append(progress)

    def should_stop(self) -> bool:
        return self._stop_after is not None and len(self.progresses) >= self._stop_after
