"""`spkd predict JOB IMAGE...` against a real `spkd serve` on loopback and the real Redis, with a
finished job whose student.onnx is a real ONNX model (tests/helpers.py onnx_classifier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from spkd.core import store
from tests.helpers import KEY_A, KEY_B, ROOT, finished_job, onnx_classifier

SPKD = [sys.executable, "-m", "spkd.cli.main"]


def _spkd(*args: str, url: str, key: str = KEY_A) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPKD_URL": url, "SPKD_API_KEY": key, "COLUMNS": "160"}
    return subprocess.run([*SPKD, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_spkd_predict_prints_labels_and_clear_errors(stack_factory, redis_url: str, tmp_path: Path) -> None:
    st = stack_factory(redis_url)
    st.start_api()
    st.wait_api()
    r, keys = store.connect(redis_url), store.Keys(st.settings.redis_prefix)
    job = finished_job(
        r, keys, st.settings, onnx_classifier(tmp_path / "model"), metrics={"shipped": "baseline"}
    )
    red, blue, text = tmp_path / "red.png", tmp_path / "blue.jpg", tmp_path / "notes.txt"
    Image.new("RGB", (60, 40), (230, 10, 10)).save(red)
    Image.new("RGB", (30, 70), (10, 10, 230)).save(blue)
    text.write_text("not an image")

    out = _spkd("predict", job["id"], str(red), str(blue), "--top-k", "1", url=st.url)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split("│")[1:-1] for line in out.stdout.splitlines() if line.count("│") == 4]
    cells = [[c.strip() for c in row] for row in rows]
    assert [c[:2] for c in cells] == [["red.png", "red"], ["blue.jpg", "blue"]], out.stdout
    assert "colour_probe (baseline student)" in out.stdout

    raw = _spkd("predict", job["id"], str(red), "--json", url=st.url)
    assert raw.returncode == 0, raw.stderr
    body = json.loads(raw.stdout)
    assert [t["label"] for t in body["predictions"][0]["top"]] == ["red", "blue"]

    for args, key, expected, code in (
        ((job["id"], str(text)), KEY_A, "422 not_an_image (images[0]): 'notes.txt' is not an image", 2),
        ((job["id"], str(red)), KEY_B, f"404 job_not_found: no job '{job['id']}' for this API key", 3),
        (("job_missing", str(red)), KEY_A, "404 job_not_found", 3),
    ):
        bad = _spkd("predict", *args, url=st.url, key=key)
        assert bad.returncode == code, bad.stdout + bad.stderr  # cli.client.ExitCode: usage, not found
        assert expected in " ".join((bad.stdout + bad.stderr).split()), bad.stderr
        assert "Traceback" not in bad.stderr
    missing = _spkd("predict", job["id"], str(tmp_path / "nope.png"), url=st.url)
    assert missing.returncode == 2 and "does not exist" in missing.stderr  # typer checks the path
