"""bench/throughput.py --tiny keeps working: it runs end to end and prints a sane table.

No timing assertions: the CPU numbers of tiny models on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_benchmark_produces_the_table(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "throughput.py"),
        "--tiny",
        "--pairs",
        "test_resnet:test_efficientnet",
        "--images",
        "24",
        "--epochs",
        "3",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "c/b" in proc.stdout and "test_resnet -> test_efficientnet" in proc.stdout
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["device"].startswith("cpu")
    (row,) = result["rows"]
    rates = {k: row[k]["img_s"] for k in ("a_naive", "b_limit", "s_student", "c_spkd", "d_cached")}
    assert all(math.isfinite(v) and v > 0 for v in rates.values()), rates
    r = row["ratios"]
    assert r["c/a"] == pytest.approx(rates["c_spkd"] / rates["a_naive"])
    assert r["c/b"] == pytest.approx(rates["c_spkd"] / rates["b_limit"])
    assert r["d/b"] == pytest.approx(rates["d_cached"] / rates["b_limit"])
    assert r["d/s"] == pytest.approx(rates["d_cached"] / rates["s_student"])
    # The engine really took the in-memory path, and (d) really used the teacher cache.
    assert row["c_spkd"]["data_path"] == "host" and row["c_spkd"]["cache_on"] is False
    assert row["d_cached"]["cache_on"] is True and row["d_cached"]["cache_build_s"] > 0
    assert len(row["c_spkd"]["epoch_img_s"]) == 3 and len(row["d_cached"]["epoch_img_s"]) == 3


@pytest.mark.slow
def test_tiny_benchmark_measures_scaling_over_two_gloo_ranks(tmp_path):
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--tiny", "--devices", "2"]
    cmd += ["--pairs", "test_resnet:test_efficientnet", "--images", "32", "--epochs", "2", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "efficiency" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    one, two = row["c_1"]["img_s"], row["c_2"]["img_s"]
    assert all(math.isfinite(v) and v > 0 for v in (one, two))
    assert row["efficiency"] == pytest.approx(two / (2 * one))
    print(proc.stdout[-600:])
