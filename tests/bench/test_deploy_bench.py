"""bench/deploy.py keeps working on a finished job's folder: it prints the deploy table, the int8
agreement on the report images, and the predict latencies of a real `spkd serve` (no timing is
asserted: CPU numbers of tiny models on a shared machine mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spkd.common.reporter import NullReporter
from spkd.common.spec import JobSpec
from tests.helpers import ROOT, small_imagefolder


@pytest.mark.slow  # a tiny job, then the bench with a real API; CI still runs it
def test_the_deploy_bench_prints_its_tables(tmp_path: Path, redis_url: str) -> None:
    from spkd.models.pipeline import run_job

    data = small_imagefolder(tmp_path / "data", per_class=4)
    spec = JobSpec.model_validate(
        {
            "teacher": {
                "model": "test_resnet",
                "weights": "none",
                "finetune": {"epochs": 1},
                "image_size": 32,
            },
            "student": {"model": "test_efficientnet", "weights": "none"},
            "dataset": {"path": str(data)},
            "train": {"epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0},
            "baseline": True,
        }
    )
    metrics = run_job(spec, data, tmp_path / "out", NullReporter(), device="cpu")
    cmd = [sys.executable, str(ROOT / "bench" / "deploy.py"), str(tmp_path / "out"), "--predict"]
    cmd += ["--clients", "1", "2", "--requests", "4", "--json", str(tmp_path / "bench.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["model", "acc", "params"]
    assert any(line.startswith("teacher ") for line in lines) and any(
        "student int8" in line for line in lines
    )
    assert "than the teacher" in proc.stdout and "int8 vs fp32 on 8 report images" in proc.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["deploy"]["models"]
    for role in ("teacher", "student"):  # recounted from the hub folders: the job's own counts
        assert rows[role]["params"] == metrics["deploy"]["models"][role]["params"]
        assert rows[role]["flops"] == metrics["deploy"]["models"][role]["flops"]
        assert rows[role]["latency_ms"]["p50"] > 0
    assert result["int8_agreement"]["images"] == 8 and 0 <= result["int8_agreement"]["agreement"] <= 1
    assert [r["clients"] for r in result["predict"]] == [1, 2]
    for r in result["predict"]:
        assert r["requests"] + r["refused_429"] == 4 and 0 < r["p50_ms"] <= r["p99_ms"]
