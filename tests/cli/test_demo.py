"""`spkd demo`: the dataset it writes, and the whole run end to end with tiny models."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from spkd.cli.demo import write_digits_imagefolder

ROOT = Path(__file__).resolve().parents[2]


def test_digits_imagefolder_is_valid(tmp_path):
    counts = write_digits_imagefolder(tmp_path / "digits", size=40, val_fraction=0.25, seed=3)

    assert sorted(counts) == ["train", "val"]
    assert sorted(counts["train"]) == [str(d) for d in range(10)]
    total = sum(sum(c.values()) for c in counts.values())
    assert total == 1797  # every scan of scikit-learn's digits, once
    for split, per_class in counts.items():
        for label, n in per_class.items():
            files = sorted((tmp_path / "digits" / split / label).glob("*.png"))
            assert len(files) == n > 0
    # Stratified: each class keeps about a quarter for validation.
    for label in counts["val"]:
        share = counts["val"][label] / (counts["val"][label] + counts["train"][label])
        assert 0.2 < share < 0.3
    # Disjoint splits, real decodable images of the requested size.
    train = {p.name for p in (tmp_path / "digits" / "train").rglob("*.png")}
    val = {p.name for p in (tmp_path / "digits" / "val").rglob("*.png")}
    assert not train & val
    sample = next((tmp_path / "digits" / "val" / "7").glob("*.png"))
    with Image.open(sample) as img:
        assert img.size == (40, 40) and img.mode == "RGB"
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # ink on paper, not a blank image


def test_digits_split_is_deterministic(tmp_path):
    write_digits_imagefolder(tmp_path / "a", size=16, seed=0)
    write_digits_imagefolder(tmp_path / "b", size=16, seed=0)

    def listing(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))

    assert listing(tmp_path / "a") == listing(tmp_path / "b")


def _children_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is dead for our purpose (its parent, the demo, has exited).
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z":
            alive.append(pid)
    return alive


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _demo(tmp_path: Path, *extra: str, sigint_ignored: bool = False) -> subprocess.Popen:
    """`spkd demo` with tiny models; `sigint_ignored` starts it as `cmd &` in a script would."""
    env = {k: v for k, v in os.environ.items() if k != "SPKD_REDIS_URL"}  # its own redis-server
    env["OMP_NUM_THREADS"] = "1"  # a shared 2-core machine: no thread oversubscription
    argv = [
        sys.executable, "-m", "spkd.cli.main", "demo",
        "--teacher", "test_efficientnet", "--student", "test_resnet",
        "--teacher-weights", "none", "--student-weights", "none",
        "--finetune-epochs", "1", "--epochs", "1", "--image-size", "32", "--batch-size", "32",
        "--per-class", "30",
        "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), *extra,
    ]  # fmt: skip
    out = subprocess.PIPE
    pre = _ignore_sigint if sigint_ignored else None
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=pre
    )


@pytest.mark.slow
def test_demo_end_to_end_with_tiny_models(tmp_path):
    """Redis, API, worker, digits, a job over REST, live events, download: then nothing left running."""
    proc = _demo(tmp_path)
    started: set[int] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        started.update(_descendants(proc.pid))
        time.sleep(0.5)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # it stops what it started; a SIGKILL would orphan them
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    output = proc.communicate()[0]
    assert proc.returncode == 0, output

    assert "started redis-server" in output
    assert "epoch_end" in output  # live progress came through the event stream
    job_dirs = list((tmp_path / "out").iterdir())
    assert len(job_dirs) == 1
    out = job_dirs[0]
    for name in ("student/model.safetensors", "student/config.json", "metrics.json"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["distilled"]["report_acc"] <= 1.0
    assert sorted(metrics["dataset"]["classes"]) == [str(d) for d in range(10)]
    counts = metrics["dataset"]["counts"]  # --per-class 30, 20% val; 10% of train selects
    assert sum(counts["train"].values()) + sum(counts["selection"].values()) == 10 * 24
    assert counts["selection"] == {str(d): 2 for d in range(10)}
    assert "student, distilled (SP)" in output
    assert "student/" in output and "the shipped student, in timm's hub layout" in output
    assert len(started) >= 3  # redis-server, api, worker (+ the worker's pool child)
    time.sleep(1)
    assert _children_alive(sorted(started)) == [], "the demo left processes running"

    # The README's "load the student" snippet, run in the folder the demo downloaded to.
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("<!-- load-student -->\n```python\n", 1)[1].split("```", 1)[0]
    image = next((tmp_path / "work" / "data" / "digits-30" / "val" / "3").glob("*.png"))
    snippet = snippet.replace('"photo.jpg"', repr(str(image)))
    argv = [sys.executable, "-c", snippet]
    res = subprocess.run(argv, cwd=out, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] in [str(d) for d in range(10)]


@pytest.mark.slow
def test_demo_interrupted_stops_everything(tmp_path):
    """Ctrl-C while the stack runs: the demo exits 130 and every process it started is gone.
    Also when its parent ignores SIGINT, as a shell does for `cmd &` in a script (CI ran it so):
    the demo then must still stop on SIGINT, not inherit the ignore."""
    proc = _demo(tmp_path, "--keep-running", sigint_ignored=True)
    started: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        started.update(_descendants(proc.pid))
        if len(started) >= 3:
            break
        time.sleep(0.2)
    assert len(started) >= 3, "the demo did not start redis, the API and the worker"
    time.sleep(2)  # let the worker get going (importing torch) before interrupting it
    started.update(_descendants(proc.pid))
    proc.send_signal(signal.SIGINT)
    try:
        output = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        # Leave nothing behind for the rest of the suite, then say what went wrong.
        for pid in [proc.pid, *started]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail("the demo ignored SIGINT for 60 s (killed it and what it started)")
    assert proc.returncode == 130, output
    assert "interrupted" in output
    time.sleep(1)
    assert _children_alive(sorted(started)) == [], "the demo left processes running"


def test_demo_spec_uses_the_job_default_sp_weight_unless_given() -> None:
    from typer.testing import CliRunner

    from spkd.cli.demo import DemoError, _sp_weight, build_spec
    from spkd.cli.main import app

    opts = {
        "teacher": "t",
        "teacher_weights": "package",
        "student": "s",
        "student_weights": "package",
        "finetune_epochs": 4,
        "epochs": 3,
        "batch_size": 32,
        "lr": 0.01,
        "image_size": 64,
        "num_workers": 0,
        "baseline": True,
        "dataset": None,
    }
    help_text = CliRunner().invoke(app, ["demo", "--help"]).output
    assert "auto" in help_text  # the documented default is the job's own
    assert build_spec({"id": "ds"}, {**opts, "sp_weight": "auto"})["distill"]["sp_weight"] == "auto"
    assert build_spec({"id": "ds"}, {**opts, "sp_weight": "300"})["distill"]["sp_weight"] == 300.0
    with pytest.raises(DemoError, match="'auto' or a number"):
        _sp_weight("lots")
    # The 8x8 digit scans: the teacher at the student's size; a folder of photos: the teacher's own.
    assert build_spec({"id": "ds"}, {**opts, "sp_weight": "auto"})["teacher"]["image_size"] == 64
    photos = build_spec({"id": "ds"}, {**opts, "sp_weight": "auto", "dataset": "/photos"})
    assert "image_size" not in photos["teacher"]
