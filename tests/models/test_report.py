"""report.html and curves.png: from a real engine run's metrics.json, and on awkward input."""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from spkd.common.spec import JobSpec
from spkd.models.results.report import write_report
from tests.helpers import HYMENOPTERA


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _slice(dst: Path, per_class: int) -> Path:
    """A few real images per class and split, plus the GIF placeholder and a truncated JPEG."""
    for split in ("train", "val"):
        for cls_dir in sorted((HYMENOPTERA / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True)
            for img in sorted(cls_dir.glob("*.jpg"))[:per_class]:
                shutil.copy(img, out / img.name)
    shutil.copy(HYMENOPTERA / "train" / "ants" / "imageNotFound.gif", dst / "train" / "ants")
    # A download cut short: the first bytes of a real photo. The loader must reject it, with a reason.
    first = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))[0]
    (dst / "train" / "bees" / "cut_short.jpg").write_bytes(first.read_bytes()[:300])
    return dst


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny real run of the engine (all stages), so the report reads a genuine metrics.json."""
    pipeline = pytest.importorskip("spkd.models.pipeline")
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("engine")
    data = _slice(root / "data", per_class=6)
    spec = JobSpec.model_validate(
        {
            "teacher": {
                "model": "test_resnet",
                "weights": "none",
                "finetune": {"epochs": 2},
                "image_size": 32,
            },
            "student": {"model": "test_efficientnet", "weights": "none"},
            "dataset": {"path": str(data)},
            "train": {"epochs": 2, "batch_size": 8, "image_size": 32, "num_workers": 0},
            "baseline": True,
        }
    )
    from spkd.common.reporter import NullReporter

    out = root / "out"
    pipeline.run_job(spec, data, out, NullReporter(), device="cpu")
    return out


def test_report_from_a_real_run(engine_run: Path):
    # The engine's export stage already wrote both (models.pipeline calls write_report).
    assert (engine_run / "report.html").stat().st_size > 0 and (engine_run / "curves.png").stat().st_size > 0
    metrics = json.loads((engine_run / "metrics.json").read_text())
    paths = write_report(engine_run)
    assert [p.name for p in paths] == ["report.html", "curves.png"]
    page = (engine_run / "report.html").read_text()

    # Self-contained: the curves are inline, nothing is fetched.
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    w, h = _png_size(engine_run / "curves.png")
    assert w >= 600 and h >= 200

    # The accuracy table shows the run's own numbers.
    for who in ("teacher", "baseline", "distilled"):
        acc = (metrics.get(who) or {}).get("report_acc")
        if acc is not None:
            assert f"{100 * acc:.1f}%" in page, who
    # Every stage with curves gets its epoch table, every timed stage its row.
    assert metrics["curves"], "the engine records epochs"
    for stage, rows in metrics["curves"].items():
        assert f"<h3>{stage}</h3>" in page and len(rows) >= 1
    for stage in metrics["timing"]:
        assert f"<th scope='row'>{stage}</th>" in page
    # The truncated photo is listed as rejected, with its reason.
    rejected = metrics["dataset"]["rejected"]
    assert any("cut_short.jpg" in r["path"] for r in rejected), rejected
    for r in rejected:
        assert html.escape(r["path"]) in page and html.escape(r["reason"]) in page
    # The spec is there to reproduce the run.
    assert "test_resnet" in page and "test_efficientnet" in page and "sp_weight" in page
    _check_header(page, metrics)
    _check_confusion(page, metrics)
    _check_loss_terms(page, metrics["curves"])
    _check_counts(page, metrics["dataset"])


def _check_header(page: str, metrics: dict) -> None:
    """Which job, on what, when: no service id in process (no Job row), the dataset, the UTC time."""
    header = re.search(r"<table class='header'>(.*?)</table>", page, re.S).group(1)
    assert "<th scope='row'>Job</th>" not in header and metrics["job"]["id"] is None
    assert html.escape(f"path {metrics['spec']['dataset']['path']}") in header
    assert metrics["job"]["exported_at"] in header and "test_resnet \u2192 test_efficientnet" in header


def _check_confusion(page: str, metrics: dict) -> None:
    """Each matrix a table with the class names on both axes and the matrix's counts in order."""
    classes = metrics["dataset"]["classes"]
    matrices = metrics["comparison"]["confusion"]
    tables = re.findall(r"<table class='confusion'>(.*?)</table>", page, re.S)
    assert len(tables) == len(matrices) >= 2
    for table, matrix in zip(tables, matrices.values(), strict=True):
        assert re.findall(r"<th scope='col'>([^<]*)</th>", table)[1:] == classes
        assert re.findall(r"<th scope='row'>([^<]*)</th>", table) == classes
        assert [int(v) for v in re.findall(r"<td[^>]*>(\d+)</td>", table)] == [v for r in matrix for v in r]


def _check_loss_terms(page: str, curves: dict) -> None:
    """The distill stage's table has CE and each distillation term apart, and they add up to the
    total the header says they make."""
    rows = curves["distill"]
    terms = [k for k in ("ce", "sp", "kd") if k in rows[0]]
    assert "ce" in terms and "sp" in terms
    for row in rows:
        assert sum(row[t] for t in terms) == pytest.approx(row["train_loss"], rel=1e-4)
    distill = page.split("<h3>distill</h3>", 1)[1].split("</table>", 1)[0]
    assert f"train loss, total ({' + '.join(terms)})" in distill
    assert "CE (train)" in distill and "sp (train, weighted)" in distill
    baseline = page.split("<h3>baseline</h3>", 1)[1].split("</table>", 1)[0]
    assert "CE (train)" in baseline and "weighted" not in baseline
    # the eval columns name their split (the rows' own keys), never a bare "val"
    for table in (distill, baseline):
        assert "selection acc" in table and "selection loss (CE)" in table and "eval acc" not in table


def _check_counts(page: str, dataset: dict) -> None:
    """Images per class and split as a table (no JSON dump), one column per split."""
    table = re.search(r"<table class='counts'>(.*?)</table>", page, re.S).group(1)
    splits = list(dataset["counts"])
    assert re.findall(r"<th scope='col'>([^<]*)</th>", table) == ["Class", *splits]
    for name in dataset["classes"]:
        row = re.search(rf"<th scope='row'>{name}</th>(.*?)</tr>", table).group(1)
        assert re.findall(r"<td>(\d+)</td>", row) == [str(dataset["counts"][s][name]) for s in splits]
    assert '"train": {' not in page


def test_report_escapes_and_tolerates_missing_parts(tmp_path: Path):
    """A file name from a user upload must not inject markup; absent stages read 'n/a'. The model
    blocks are in the old format (`val_acc`, before every number named its split): still read."""
    metrics = {
        "teacher": {"val_acc": None},
        "baseline": None,
        "distilled": {"val_acc": 0.625},
        "gain": None,
        "curves": {},
        "dataset": {
            "classes": ["a<b>", "c"],
            "counts": {"all": {"a<b>": 3, "c": 4}},
            "rejected": [{"path": "x/<img src=x onerror=alert(1)>.jpg", "reason": "not an image & broken"}],
        },
        "timing": {"distill": 75.5},
        "spec": {"teacher": {"model": "t"}, "student": {"model": "s"}},
        "device": "cpu",
        "job": {"id": "job_<x>", "name": None, "exported_at": "2026-12-03T15:00:00+00:00"},
        "comparison": {"confusion": {"baseline": [[1, 2], [0, 3]]}},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    write_report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<img src=x" not in page and "<x>" not in page and "job_&lt;x&gt;" in page
    assert "<th scope='row'>a&lt;b&gt;</th><td>3</td>" in page  # the counts table, escaped
    assert "<th scope='col'>a&lt;b&gt;</th>" in page  # the confusion matrix's column
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "not an image &amp; broken" in page
    assert "62.5%" in page and page.count("n/a") >= 3
    assert "1 min 15.5 s" in page and "No epochs recorded." in page
    assert _png_size(tmp_path / "curves.png")[0] > 0


def test_a_stage_added_to_the_stage_list_gets_its_own_colour(monkeypatch: pytest.MonkeyPatch):
    """The report's colours follow common.spec.STAGES, the one list of stages: a new stage there is
    drawn in a colour of its own, not the fallback for names the list does not know."""
    from spkd.common import spec
    from spkd.models.results import report

    monkeypatch.setattr(spec, "STAGES", (*spec.STAGES, "int8"))
    colours = [report.stage_colour(name) for name in spec.STAGES]
    assert len(set(colours)) == len(colours) and report.FALLBACK_COLOUR not in colours
    assert report.stage_colour("not_a_stage") == report.FALLBACK_COLOUR
