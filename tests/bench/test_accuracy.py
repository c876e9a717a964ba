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
    assert "| mean +- std |" in printed and "| seed |" in printed and "Paired difference" in printed
    result = json.loads((tmp_path / "acc.json").read_text())
    assert [r["seed"] for r in result["rows"]] == [0, 1]
    variants = ["baseline", "sp:3000", "auto", "search:300/1000/3000"]
    for row in result["rows"]:
        assert list(row["variants"]) == variants
        seed_dir = tmp_path / "runs" / f"seed{row['seed']}"
        auto = json.loads((seed_dir / "auto" / "metrics.json").read_text())
        assert row["variants"]["auto"]["acc"] == auto["distilled"]["report_acc"]
        assert row["variants"]["baseline"]["acc"] == auto["baseline"]["report_acc"]
        fixed = json.loads((seed_dir / "sp_3000" / "metrics.json").read_text())
        # every variant distils from the seed's fine-tuned teacher, as it is
        assert fixed["spec"]["teacher"]["weights"] == str(seed_dir / "auto" / "teacher" / "model.safetensors")
        assert fixed["spec"]["teacher"]["finetune"] is None
        assert fixed["distill_weights"]["sp"]["weight"] == 3000.0
        searched = json.loads((seed_dir / "search_300_1000_3000" / "metrics.json").read_text())
        assert searched["distill_weights"]["sp"]["mode"] == "search"
        # what the old and the new rule ship, judged on the report split
        rules = row["rules"]
        assert rules["new"] == auto["shipped"] and rules["old"] == auto["old_rule_shipped"]["student"]
        assert rules["report"] == {w: auto[w]["report_acc"] for w in ("baseline", "distilled", "soup")}
        b, d = rules["report"]["baseline"], rules["report"]["distilled"]
        assert rules["report_better"] == ("tie" if b == d else "distilled" if d > b else "baseline")
        assert rules["new_right"] == (rules["report"][rules["new"]] >= max(b, d))
        assert row["variants"]["auto"]["shipped"] == auto[auto["shipped"]]["report_acc"]
        # the teacher against the student alone, and whether the weak-teacher check fired
        tvs, check = row["teacher_vs_student"], auto["distill_weights"]["teacher_check"]
        assert (tvs["teacher"], tvs["baseline"]) == (
            auto["teacher"]["report_acc"],
            auto["baseline"]["report_acc"],
        )
        assert tvs["teacher_select"] == check["teacher_select_acc"] and tvs["weak"] is (
            not check["teacher_better"]
        )
        assert tvs["sp_share"] == auto["distill_weights"]["sp"]["share"]
    assert "The teacher against the student alone" in printed
    assert "Shipping rules" in printed and "| seed | baseline | distilled | soup |" in printed
    right = sum(r["rules"]["new_right"] for r in result["rows"])
    assert f"new rule {right}/2" in printed
    summary = result["summary"]
    assert set(summary) == set(variants)
    for name in variants:
        base = summary["baseline"]["acc"]
        assert summary[name]["diff"] == [a - b for a, b in zip(summary[name]["acc"], base, strict=True)]

    # Rerun with one more variant: the finished jobs are read back (not retrained), the new one runs.
    seed0 = tmp_path / "runs" / "seed0"
    stamp = (seed0 / "auto" / "metrics.json").stat().st_mtime_ns
    again = tmp_path / "again.json"
    out = ["--out", str(tmp_path / "runs"), "--json", str(again)]
    argv = [
        "--tiny",
        "--data",
        str(color_dataset),
        *out,
        "--seeds",
        "0",
        "--variants",
        "baseline",
        "auto",
        "sp+kd",
    ]
    assert bench.main(argv) == 0
    capsys.readouterr()
    assert (seed0 / "auto" / "metrics.json").stat().st_mtime_ns == stamp
    row = json.loads(again.read_text())["rows"][0]
    assert row["variants"]["auto"] == result["rows"][0]["variants"]["auto"]
    assert row["seconds"]["auto"] == result["rows"][0]["seconds"]["auto"]
    with_kd = json.loads((seed0 / "sp_kd" / "metrics.json").read_text())
    assert with_kd["distill_weights"]["kd"]["mode"] == "auto" and row["variants"]["sp+kd"]["acc"] > 0

    # Seeds run apart (one process or host each) merge into the same table.
    first = dict(result, rows=result["rows"][:1], args={**result["args"], "seeds": [0]})
    second = dict(result, rows=result["rows"][1:], args={**result["args"], "seeds": [1]})
    parts = [tmp_path / "s0.json", tmp_path / "s1.json"]
    for path, part in zip(parts, (first, second), strict=True):
        path.write_text(json.dumps(part))
    assert bench.main(["--merge", *map(str, parts), "--json", str(tmp_path / "merged.json")]) == 0
    merged_table = capsys.readouterr().out
    assert "| mean +- std |" in merged_table and merged_table.strip() in printed  # the same table
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["rows"] == result["rows"] and merged["summary"] == result["summary"]
    with pytest.raises(SystemExit, match="appears twice"):
        bench.main(["--merge", str(parts[0]), str(parts[0])])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(second, args={**second["args"], "epochs": 7})))
    with pytest.raises(SystemExit, match="not the same settings"):
        bench.main(["--merge", str(parts[0]), str(other)])


def test_recipe_variants_parse_to_valid_jobs(tmp_path):
    bench = _load_bench()
    args = bench.parse_args(["--data", str(tmp_path), "--image-size", "64", "--variants", *bench.RECIPES])
    teacher_file = tmp_path / "teacher.safetensors"
    for name, distill in bench.RECIPES.items():
        spec = bench.job_spec(args, 0, teacher_file, bench.parse_variant(name)["distill"])
        dumped = spec.distill.model_dump()
        for key, value in distill.items():
            assert dumped[key] == value if key != "methods" else set(dumped[key]) == set(value)
    with pytest.raises(SystemExit, match="sp\\+kd"):
        bench.parse_args(["--variants", "sp+nothing"])
    with pytest.raises(SystemExit, match="'same' or a number"):
        bench.parse_args(["--teacher-size", "big"])
    with pytest.raises(SystemExit, match="'auto' or a number"):
        bench.parse_args(["--teacher-epochs", "long"])
    # the new teacher defaults (auto size, early stopping) against the old protocol's
    new = bench.job_spec(bench.parse_args(["--teacher-epochs", "auto", "--image-size", "64"]), 0)
    old = bench.job_spec(
        bench.parse_args(["--teacher-size", "same", "--image-size", "64", "--epochs", "3"]), 0
    )
    assert (new.teacher.finetune.epochs, new.teacher.image_size) == ("auto", "auto")
    assert (old.teacher.finetune.epochs, old.teacher.image_size) == (3, 64)
    assert new.teacher.finetune.body_lr_scale == old.teacher.finetune.body_lr_scale == 1.0  # the job default
    body = bench.job_spec(bench.parse_args(["--teacher-body-lr", "0.1"]), 0)
    assert body.teacher.finetune.body_lr_scale == 0.1
