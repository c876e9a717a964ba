"""`spkd run JOB.yaml --out DIR`: the real command, in a subprocess, on a tiny job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

SPKD = [sys.executable, "-m", "spkd.cli.main"]
ROOT = Path(__file__).resolve().parents[2]


def _spkd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run([*SPKD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_run_writes_artifacts_and_prints_accuracies(color_dataset, tmp_path):
    job = {
        "teacher": {"model": "test_resnet", "weights": "none", "image_size": 32},
        "student": {"model": "test_efficientnet", "weights": "none"},
        "dataset": {"path": str(color_dataset)},
        "train": {"epochs": 1, "batch_size": 16, "image_size": 32, "num_workers": 0},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = _spkd("run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "distill epoch 1/1" in result.stdout and "distilled" in result.stdout
    # every number names its split: the epoch lines the selection split's, the summary the report's
    assert re.search(r"distill epoch 1/1: train loss [\d.]+, selection acc [\d.]+,", result.stdout), (
        result.stdout
    )
    assert "report-split accuracy: teacher " in result.stdout and "val acc" not in result.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["baseline"] is not None and metrics["gain"] is not None
    # the gain with its error bars, and what shipped, in the printed summary
    cmp = metrics["comparison"]
    assert f"95 % CI {cmp['ci95_points'][0]:+.1f} to {cmp['ci95_points'][1]:+.1f}" in result.stdout
    assert "McNemar p =" in result.stdout and cmp["verdict"] in result.stdout
    assert f"shipped as student/ and student.onnx: the {metrics['shipped']} student" in result.stdout
    # what each model costs, measured side by side, and the int8 student: the deploy table
    assert metrics["deploy"]["student_vs_teacher"]["headline"] in result.stdout
    assert "p50 ms" in result.stdout and "student int8" in result.stdout
    assert (tmp_path / "out" / "student.int8.onnx").is_file()
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"student", "teacher", "student.onnx"} <= names and not [n for n in names if ".safetensors" in n]
    assert (tmp_path / "out" / "student" / "model.safetensors").is_file()
    listed = " ".join(result.stdout.split("artifacts in", 1)[1].split())  # rich wraps long lines
    assert "student/" in listed and "teacher/" in listed and "tensorboard/" in listed, listed
    assert "checkpoints" not in listed, listed
    # the local run is tracked like a worker's: TensorBoard files per stage
    assert list((tmp_path / "out" / "tensorboard" / "distill").glob("events.out.tfevents.*"))


def test_bad_fields_are_clear(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "teacher: {model: test_resnet, weights: pickle}\nstudent: {model: test_vit}\n"
        "dataset: {path: x}\ntrain: {epochs: -1, batchsize: 3}\n"
    )
    result = _spkd("run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), cwd=ROOT)
    assert result.returncode == 2
    for field in ("teacher.weights", "train.epochs", "train.batchsize"):
        assert field in result.stdout
    assert not (tmp_path / "out").exists()


def test_engine_errors_name_code_and_field(color_dataset, tmp_path):
    (tmp_path / "job.yaml").write_text(
        f"teacher: {{model: test_resnet, weights: none}}\nstudent: {{model: resnet_18}}\n"
        f"dataset: {{path: {color_dataset}}}\n"
    )
    result = _spkd("run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), cwd=ROOT)
    assert result.returncode == 2
    assert (
        "unknown_model" in result.stdout and "student.model" in result.stdout and "resnet18" in result.stdout
    )


def test_a_source_only_a_server_reads_is_named_as_it_is(tmp_path):
    """`spkd run` reads a folder; a spec naming another dataset source says which one it named."""
    base = (
        "teacher: {model: test_resnet, weights: none}\nstudent: {model: test_efficientnet, weights: none}\n"
    )
    for source, said in (
        ("{id: ds_abc}", "dataset.id names an uploaded dataset on a server"),
        ("{hf: beans}", "dataset.hf is loaded by a server's workers"),
        ("{torchvision: CIFAR10}", "dataset.torchvision is downloaded by a server's workers"),
    ):
        (tmp_path / "job.yaml").write_text(f"{base}dataset: {source}\n")
        result = _spkd("run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), cwd=ROOT)
        assert result.returncode == 2, result.stdout + result.stderr
        assert said in " ".join(result.stdout.split()), (source, result.stdout)
        assert "locally use dataset.path or --data" in " ".join(result.stdout.split())
        assert not (tmp_path / "out").exists()
