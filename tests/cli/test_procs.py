"""cli/procs.py against real child processes: process groups that resist, servers that die or never
answer. Each test starts only tiny `python -c` children and finishes in seconds."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from spkd.cli import procs

# Ignores SIGTERM (says so in its log), starts a grandchild that ignores it silently, then idles.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("TERM ignored", flush=True))
grand = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" \\
        "print('grandchild ready', flush=True)\\nwhile True: time.sleep(0.1)"
g = subprocess.Popen([sys.executable, "-c", grand])
print(f"grandchild pid {g.pid}", flush=True)
while True:
    time.sleep(0.1)
"""

# Starts a grandchild that idles, then exits at once: the group outlives its leader.
ORPHANING = """
import subprocess, sys
grand = "import time\\nprint('grandchild ready', flush=True)\\ntime.sleep(600)"
g = subprocess.Popen([sys.executable, "-c", grand])
print(f"grandchild pid {g.pid}", flush=True)
"""


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _gone(pid: int) -> bool:
    """No such process, or a zombie (dead; only its exit status waits for whoever reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def _wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _grandchild(proc: procs.Proc) -> int:
    """Wait for the child to report its grandchild (ready, signal handler installed); its pid."""
    procs.wait_until(lambda: "grandchild ready" in proc.log.read_text(), 20, "the grandchild")
    line = next(ln for ln in proc.log.read_text().splitlines() if ln.startswith("grandchild pid"))
    return int(line.split()[-1])


def test_free_port_is_bindable() -> None:
    import socket

    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    proc = procs.spawn("stubborn", _python(STUBBORN), tmp_path / "stubborn.log")
    grandchild = _grandchild(proc)
    assert os.getpgid(grandchild) == proc.pid  # the grandchild is in the child's group

    t0 = time.monotonic()
    proc.stop(grace_s=1.0)
    took = time.monotonic() - t0

    assert proc.popen.returncode == -signal.SIGKILL  # reaped, and only SIGKILL ended it
    assert "TERM ignored" in proc.log.read_text()  # SIGTERM came first: a chance to shut down warm
    assert 1.0 <= took < 8.0
    assert _wait_gone(grandchild), f"grandchild {grandchild} survived the group stop"


def test_stop_returns_quickly_when_sigterm_is_honoured(tmp_path: Path) -> None:
    proc = procs.spawn("polite", _python("import time\nwhile True: time.sleep(0.1)"), tmp_path / "p.log")
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.stop(grace_s=20.0)
    assert time.monotonic() - t0 < 5.0
    assert proc.popen.returncode == -signal.SIGTERM


def test_stop_reaches_the_group_after_its_leader_exited(tmp_path: Path) -> None:
    proc = procs.spawn("orphaning", _python(ORPHANING), tmp_path / "orphaning.log")
    grandchild = _grandchild(proc)
    proc.popen.wait(20)
    assert not _gone(grandchild)

    proc.stop(grace_s=1.0)

    assert _wait_gone(grandchild), f"grandchild {grandchild} survived its leader's stop"


def test_kill_is_immediate(tmp_path: Path) -> None:
    proc = procs.spawn("stubborn", _python(STUBBORN), tmp_path / "stubborn.log")
    grandchild = _grandchild(proc)
    proc.kill()
    assert proc.popen.returncode == -signal.SIGKILL
    assert "TERM ignored" not in proc.log.read_text()
    assert _wait_gone(grandchild)


def test_wait_http_fails_early_with_the_log_tail_when_the_process_dies(tmp_path: Path) -> None:
    code = (
        "import sys\nprint('starting')\nprint('fatal: no such setting SPKD_BOGUS', flush=True)\nsys.exit(3)"
    )
    proc = procs.spawn("api", _python(code), tmp_path / "api.log")
    url = f"http://127.0.0.1:{procs.free_port()}/readyz"
    t0 = time.monotonic()
    with pytest.raises(procs.ProcessExited) as err:
        procs.wait_http(url, 60, watch=[proc])
    assert time.monotonic() - t0 < 20  # long before the timeout
    msg = str(err.value)
    assert "api exited with code 3" in msg
    assert "fatal: no such setting SPKD_BOGUS" in msg
    assert str(proc.log) in msg


def test_wait_http_times_out_cleanly_when_nothing_answers(tmp_path: Path) -> None:
    idle = procs.spawn("idle", _python("import time\ntime.sleep(600)"), tmp_path / "idle.log")
    try:
        url = f"http://127.0.0.1:{procs.free_port()}/readyz"
        t0 = time.monotonic()
        with pytest.raises(procs.NotReady) as err:
            procs.wait_http(url, 1.0, watch=[idle], interval_s=0.1)
        took = time.monotonic() - t0
        assert not isinstance(err.value, procs.ProcessExited)
        assert 1.0 <= took < 6.0
        assert "timed out after 1 s" in str(err.value)
        assert "ConnectError" in str(err.value)  # what it saw last
        assert idle.running()  # waiting did not touch the watched process
    finally:
        idle.stop(grace_s=5.0)


def test_wait_http_needs_a_200(tmp_path: Path) -> None:
    """A real HTTP server: a path it serves is ready, a 404 is not (and the timeout says 404)."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "readyz").write_text("ok")
    port = procs.free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with procs.Group(tmp_path / "logs", cwd=tmp_path / "www", grace_s=5.0) as group:
        server = group.start("www", argv)
        procs.wait_http(f"http://127.0.0.1:{port}/readyz", 30, watch=[server])
        with pytest.raises(procs.NotReady, match="last answer: 404"):
            procs.wait_http(f"http://127.0.0.1:{port}/missing", 0.5, watch=[server], interval_s=0.1)
    assert server.popen.returncode is not None


def test_wait_until_with_a_predicate(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    proc = procs.spawn(
        "writer",
        _python(f"import time, pathlib\ntime.sleep(0.5)\npathlib.Path({str(flag)!r}).touch()"),
        tmp_path / "w.log",
    )
    procs.wait_until(flag.exists, 20, "the flag file", interval_s=0.05)
    proc.popen.wait(20)
    with pytest.raises(procs.NotReady, match="timed out after 0.2 s waiting for never"):
        procs.wait_until(lambda: False, 0.2, "never", interval_s=0.05)


def test_group_checks_its_processes_and_stops_newest_first(tmp_path: Path) -> None:
    order = tmp_path / "order"
    handler = (
        "import signal, sys, time\n"
        "def term(*_):\n"
        f"    open({str(order)!r}, 'a').write(sys.argv[1] + '\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    group = procs.Group(tmp_path / "logs", grace_s=5.0)
    try:
        first = group.start("redis", [*_python(handler), "redis"])
        second = group.start("api", [*_python(handler), "api"])
        for p in (first, second):
            procs.wait_until(lambda p=p: "ready" in p.tail(), 20, f"{p.name} to start")
        group.check()  # both alive: no error
        doomed = group.start(
            "worker", _python("import sys\nprint('worker: cannot import torch')\nsys.exit(2)")
        )
        doomed.popen.wait(20)
        with pytest.raises(procs.ProcessExited, match="(?s)worker exited with code 2.*cannot import torch"):
            group.check()
    finally:
        group.stop()
    assert group.procs == []
    assert order.read_text().split() == ["api", "redis"]
    assert (tmp_path / "logs" / "worker.log").exists()
