"""`spkd pause` and `spkd resume` on a real job: real `spkd` processes against a real `spkd serve` +
`spkd worker` (the `service` fixture) and the real Redis. `spkd submit --wait` follows the job
until it pauses (a paused job's event stream stays open for its resume) and says how to go on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spkd.core import store
from tests.helpers import KEY_A, Service, dump, events, small_imagefolder, tiny_spec, wait_event, wait_final

SPKD = [sys.executable, "-m", "spkd.cli.main"]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _env(service: Service) -> dict[str, str]:
    return {**os.environ, "SPKD_URL": service.url, "SPKD_API_KEY": KEY_A, "COLUMNS": "200"}


def _spkd(service: Service, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SPKD, *args], cwd=ROOT, env=_env(service), capture_output=True, text=True, timeout=120
    )


def _text(res: subprocess.CompletedProcess) -> str:
    return res.stdout + res.stderr


def test_pause_and_resume_from_the_cli(service: Service, tmp_path: Path) -> None:
    small_imagefolder(Path(service.settings.data_root) / "hym", per_class=4)
    r, keys = store.connect(service.settings.redis_url), store.Keys(service.settings.redis_prefix)
    train = {"epochs": 40, "batch_size": 2, "image_size": 32, "num_workers": 0}
    spec = tiny_spec({"path": "hym"}, train=train)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    follower = subprocess.Popen(
        [*SPKD, "submit", str(tmp_path / "job.yaml"), "--wait"],
        cwd=ROOT,
        env=_env(service),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = follower.stdout.readline().strip()
        assert job_id.startswith("job_"), job_id + follower.stderr.read()
        first = wait_event(r, keys, job_id, lambda e: e["kind"] == "checkpoint", 180)

        paused = _spkd(service, "pause", job_id)
        assert paused.returncode == 0, _text(paused)
        assert f"{job_id}: running (pause requested)" in _text(paused), _text(paused)
        wait_event(r, keys, job_id, lambda e: e["data"].get("status") == "paused", 120, first["id"])

        # `submit --wait` stops following at the pause (not succeeded) and names the way on.
        out, err = follower.communicate(timeout=60)
        assert follower.returncode == 1, out + err  # ExitCode.NOT_DONE: the followed job paused
        assert f"paused: `spkd resume {job_id}`" in err, err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()

    shown = _spkd(service, "status", job_id)
    assert shown.returncode == 0 and f"{job_id}  paused" in _text(shown), _text(shown)
    listed = _spkd(service, "status", "--status", "paused")
    assert listed.returncode == 0 and job_id in listed.stdout and "paused" in listed.stdout, _text(listed)
    again = _spkd(service, "pause", job_id)
    assert again.returncode == 1 and "409 job_paused" in _text(again), _text(again)
    assert "Traceback" not in _text(again)

    deadline = time.monotonic() + 30
    while True:  # its process may still be letting go of the lease for a moment
        resumed = _spkd(service, "resume", job_id)
        if "shutting down" not in _text(resumed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert resumed.returncode == 0, _text(resumed)
    assert f"{job_id}: queued (resumes from its last checkpoint)" in _text(resumed), _text(resumed)
    resumed_from = wait_event(r, keys, job_id, lambda e: "resuming from checkpoint" in e["message"], 120)
    assert "(distill epoch " in resumed_from["message"], dump(events(r, keys, job_id))

    cancelled = _spkd(service, "cancel", job_id)  # the rest of its 40 epochs is not needed here
    assert cancelled.returncode == 0, _text(cancelled)
    assert wait_final(r, keys, job_id, 120)["status"] == "cancelled"
    final = _spkd(service, "pause", job_id)
    assert final.returncode == 1 and "409 job_finished" in _text(final), _text(final)
