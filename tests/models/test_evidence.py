"""A job whose selection split has very few images per class says its choices rest on little
evidence: a warning event once the scan is done, and the same sentence in metrics.json and the
report. Real image folders, scanned the way a job scans them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spkd.common.reporter import RecordingReporter
from spkd.models.data import loader
from spkd.models.data.evidence import MIN_PER_CLASS, MIN_TOTAL, thin_selection
from spkd.models.pipeline import run_job
from tests.helpers import make_folder, tiny_job_spec


def _scan(root: Path, selection_fraction: float, ship_fraction: float = 0.0) -> loader.DatasetScan:
    scan = loader.scan_dataset(root, 0.2, 0)
    scan = loader.with_selection(scan, selection_fraction, 0)
    return loader.with_ship_part(scan, ship_fraction, 0)


def test_a_thin_selection_split_is_named_with_its_numbers(color_dataset):
    # 48 training images, 10 % carved out: 4 selection images, 2 a class
    scan = _scan(color_dataset, 0.1)
    note = thin_selection(scan, 0.1)
    fewest = min(loader.count_per_class(scan.selection, scan.classes).values())
    assert note is not None and len(scan.selection) < MIN_TOTAL
    assert f"the selection split has {len(scan.selection)} images, {fewest} of them of class" in note
    assert "dataset.selection_fraction (now 0.1)" in note and "add training images" in note
    assert "best epochs and the shipped student" in note
    # no selection split: nothing is chosen, nothing to warn about
    assert thin_selection(_scan(color_dataset, 0.0), 0.0) is None


def test_enough_selection_images_do_not_warn(tmp_path):
    make_folder(tmp_path / "train", {"a": 120, "b": 120}, seed=1)
    make_folder(tmp_path / "val", {"a": 5, "b": 5}, seed=2)
    scan = _scan(tmp_path, 0.5)  # 120 selection images, 60 a class
    assert len(scan.selection) >= MIN_TOTAL
    assert min(loader.count_per_class(scan.selection, scan.classes).values()) >= MIN_PER_CLASS
    assert thin_selection(scan, 0.5) is None
    # the same images with a ship part: each part is judged on its own (60 images each)
    note = thin_selection(_scan(tmp_path, 0.5, ship_fraction=0.5), 0.5)
    assert note is not None and "pick part has 60 images" in note and "ship part has 60 images" in note


def test_with_a_test_split_the_advice_is_val(tmp_path):
    make_folder(tmp_path / "train", {"a": 20, "b": 20}, seed=1)
    make_folder(tmp_path / "val", {"a": 3, "b": 8}, seed=2)
    make_folder(tmp_path / "test", {"a": 5, "b": 5}, seed=3)
    scan = _scan(tmp_path, 0.1)  # val/ selects, test/ reports
    note = thin_selection(scan, 0.1)
    assert note is not None and "11 images, 3 of them of class 'a'" in note
    assert "add images to val/" in note and "selection_fraction" not in note


@pytest.fixture(scope="module")
def thin_run(color_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("thin")
    reporter = RecordingReporter()
    metrics = run_job(tiny_job_spec(train={"epochs": 1}), color_dataset, out, reporter)
    return out, metrics, reporter


def test_the_job_warns_and_the_report_repeats_it(thin_run):
    out, metrics, reporter = thin_run
    kinds = [kind for kind, _, _ in reporter.events]
    warnings = [(i, m) for i, (kind, m, _) in enumerate(reporter.events) if "few selection images" in m]
    assert len(warnings) == 1, warnings
    at, note = warnings[0]
    assert reporter.events[at][0] == "warning"
    assert kinds.index("dataset") < at < kinds.index("stage_started")  # when the scan is done
    assert metrics["protocol"]["selection_note"] == note
    assert json.loads((out / "metrics.json").read_text())["protocol"]["selection_note"] == note
    assert note.replace("'", "&#x27;") in (out / "report.html").read_text()
