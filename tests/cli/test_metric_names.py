"""The CLI's accuracy lines name their split (the report split) and still read a job stored before
the rename, whose metrics.json called every accuracy `val_acc` (common/metric_names.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from spkd.cli import demo, jobs, local

NEW = {
    "teacher": {"report_acc": 0.9, "select_acc": 0.5},
    "baseline": {"report_acc": 0.75, "select_acc": 0.5},
    "distilled": {"report_acc": 0.8, "select_acc": 0.25},
    "gain": 0.05,
}
# the same job as stored before every number named its split
OLD = {
    "teacher": {"val_acc": 0.9, "select_acc": 0.5},
    "baseline": {"val_acc": 0.75, "select_acc": 0.5},
    "distilled": {"val_acc": 0.8, "select_acc": 0.25},
    "gain": 0.05,
}


@pytest.mark.parametrize("metrics", [NEW, OLD], ids=["new", "old"])
def test_submit_wait_outcome_line(metrics):
    with jobs.console.capture() as out:
        jobs._print_outcome({"id": "job_x", "status": "succeeded", "metrics": metrics})
    text = out.get()
    assert "report-split accuracy: distilled 0.8, baseline 0.75, gain 0.05" in text, text
    assert "val_acc" not in text and "None" not in text


@pytest.mark.parametrize("metrics", [NEW, OLD], ids=["new", "old"])
def test_run_summary(metrics, tmp_path: Path):
    console = Console(width=200, record=True)
    local._summary(metrics, tmp_path, console)
    text = console.export_text()
    assert "report-split accuracy: teacher 90.00%  baseline 75.00%  distilled 80.00%" in text, text


@pytest.mark.parametrize("metrics", [NEW, OLD], ids=["new", "old"])
def test_demo_summary(metrics):
    lines = demo.summary(metrics)
    assert lines[:3] == [
        "  teacher (fine-tuned)      90.00 %",
        "  student, fine-tune only   75.00 %",
        "  student, distilled (SP)   80.00 %",
    ], lines
