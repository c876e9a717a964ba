"""bench/accuracy.py --tiny: the multi-seed accuracy table runs end to end on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two whole (tiny) jobs; a bench smoke test, CI still runs it
def test_tiny_table(color_dataset, tmp_path, capsys):
    bench = _load_bench()
    code = bench.main(
        [
            "--tiny",
            "--data",
            str(color_dataset),
            "--out",
            str(tmp_path / "runs"),
            "--seeds",
            "0",
            "1",
            "--json",
            str(tmp_path / "acc.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mean +- std |" in printed and "| seed |" in printed
    result = json.loads((tmp_path / "acc.json").read_text())
    assert [r["seed"] for r in result["rows"]] == [0, 1]
    for row in result["rows"]:
        assert row["gain"] == row["distilled"] - row["baseline"]
        assert (tmp_path / "runs" / f"seed{row['seed']}" / "metrics.json").is_file()
    assert set(result["summary"]) == {"teacher", "baseline", "distilled", "gain"}
