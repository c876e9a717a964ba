"""The client commands against an API that is not there: one line that says what to check, exit
code 5 (the server), never a traceback (real `spkd` processes, a loopback port nothing listens on)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SPKD = [sys.executable, "-m", "spkd.cli.main"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on close: nothing listens there


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "job_x"],
        ["events", "job_x"],
        ["cancel", "job_x"],
        ["pause", "job_x"],
        ["delete", "job_x"],
        ["resume", "job_x"],
        ["download", "job_x", "-o", "out"],
        ["datasets", "list"],
        ["datasets", "delete", "ds_x"],
    ],
    ids=lambda a: " ".join(a),
)
def test_an_unreachable_api_is_one_clear_line(args: list[str], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "SPKD_URL": url, "SPKD_API_KEY": "k" * 32, "COLUMNS": "200"}
    out = subprocess.run([*SPKD, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 5, text
    assert "Traceback" not in text and len(text.strip().splitlines()) <= 3, text
    assert f"cannot reach the spkd API at {url}" in text and "SPKD_URL" in text, text
