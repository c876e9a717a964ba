"""Start, wait for and stop the helper processes spkd's launchers need (`spkd serve`, `spkd worker`,
`redis-server`): one implementation for `spkd demo`, the tests and bench/.

Every child runs in a new session, so it leads its own process group: uvicorn and Celery fork
(Celery's pool process runs the job), and stopping only the leader would orphan those children;
a new session also keeps a terminal's Ctrl-C away from the children, so the launcher decides when
and in which order they stop. Output goes to a log file, whose tail explains a child that died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx


class NotReady(RuntimeError):
    """What was waited for did not happen within the timeout."""


class ProcessExited(NotReady):
    """A watched process died while we waited for it (or for something it provides)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A started child process: the name it is reported under, its Popen and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """Also the id of its process group (it was started in a new session)."""
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        """The last lines of its log: usually why it died."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """Graceful: see stop_group."""
        stop_group(self.popen, grace_s)

    def kill(self) -> None:
        """SIGKILL the whole group at once (no cleanup at all, as in a crash) and reap the leader."""
        stop_group(self.popen, grace_s=0.0)


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    append: bool = False,
) -> Proc:
    """Start `argv` in a new session (its own process group), stdout and stderr into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # The child gets its own copy of the descriptor; ours is closed right away.
    with log.open("ab" if append else "wb") as out:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def stop_group(popen: subprocess.Popen[bytes], grace_s: float = 10.0, kill_wait_s: float = 5.0) -> None:
    """SIGTERM the process group (a warm shutdown for uvicorn and Celery), SIGKILL it when the leader
    is still there after `grace_s`, and reap the leader.

    The group is signalled even when the leader has already exited, and SIGKILLed once more at the
    end: children (Celery's pool process, anything that ignores SIGTERM) may outlive the leader.
    (Linux does not hand out a pid while a process group of that id has members, so the signals
    reach this group's leftovers, not a newcomer that got the leader's pid.)
    """
    pgid = popen.pid  # start_new_session: the leader's pid is the group id
    steps = [(signal.SIGTERM, grace_s)] if grace_s > 0 else []
    for sig, wait_s in [*steps, (signal.SIGKILL, kill_wait_s)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        try:
            popen.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def check_alive(procs: Iterable[Proc], context: str = "") -> None:
    """Raise ProcessExited, with its log tail, for the first of `procs` that has died."""
    for proc in procs:
        if not proc.running():
            raise ProcessExited(
                f"{proc.name} exited with code {proc.popen.returncode}{context}; "
                f"the end of {proc.log}:\n{proc.tail()}"
            )


def wait_until(
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    watch: Iterable[Proc] = (),
    interval_s: float = 0.3,
) -> None:
    """Poll `ready` until it is true; raise NotReady after `timeout_s`.

    Raises ProcessExited, with its log tail, as soon as a watched process dies: waiting out the
    timeout for a server that crashed on start only hides the reason.
    """
    watched = list(watch)
    deadline = time.monotonic() + timeout_s
    while True:
        check_alive(watched, f" while waiting for {what}")
        if ready():
            return
        if time.monotonic() >= deadline:
            raise NotReady(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def wait_http(url: str, timeout_s: float, watch: Iterable[Proc] = (), interval_s: float = 0.3) -> None:
    """Wait until GET `url` answers 200 (see wait_until); a timeout says what it answered last."""
    last = "no connection yet"

    def answers() -> bool:
        nonlocal last
        try:
            resp = httpx.get(url, timeout=2.0)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
            return False
        last = f"{resp.status_code} {resp.text[:300]}"
        return resp.status_code == 200

    try:
        wait_until(answers, timeout_s, f"GET {url} to answer 200", watch, interval_s)
    except ProcessExited:
        raise
    except NotReady as exc:
        raise NotReady(f"{exc}; last answer: {last}") from None


@dataclass
class Group:
    """Processes started together and stopped together, newest first (the worker before the API it
    reports to, the API before the Redis it uses). Usable as a context manager."""

    log_dir: Path
    cwd: Path | None = None
    grace_s: float = 10.0
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        """Spawn `argv` with its output in `<log_dir>/<name>.log`."""
        proc = spawn(name, argv, self.log_dir / f"{name}.log", env=env, cwd=self.cwd)
        self.procs.append(proc)
        return proc

    def check(self) -> None:
        """Raise ProcessExited, with the log tail, when a process of the group has died."""
        check_alive(self.procs)

    def stop(self) -> None:
        """Stop every process, newest first. A process leaves the list only once stopped, so a
        second call (atexit, after an interrupted first one) finishes the job."""
        while self.procs:
            self.procs[-1].stop(self.grace_s)
            self.procs.pop()

    def __enter__(self) -> Group:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
