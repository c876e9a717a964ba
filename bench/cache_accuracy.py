"""Does the teacher-feature cache change accuracy? Cached vs live teacher on hymenoptera, 3 seeds.

Each seed runs the full engine twice (models.pipeline.run_job), identical except
distill.teacher_cache = off | on, and reports the distilled student's validation accuracy, its
mean and spread over seeds, and the distill stage's time. The reference runs: on this 153-image
validation set one image is 0.65 points, so only a difference beyond the seed spread means much.

    python bench/cache_accuracy.py                # GPU host: tf_efficientnet_lite2 -> lite0, package weights
    python bench/cache_accuracy.py --tiny         # CPU: tiny random-init models (a smoke test, not a result)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ../shared/data (this workspace) or shared/data inside the checkout (a copied working tree).
HYMENOPTERA = next(
    (
        p
        for p in (ROOT.parent / "shared" / "data" / "hymenoptera", ROOT / "shared" / "data" / "hymenoptera")
        if p.is_dir()
    ),
    ROOT.parent / "shared" / "data" / "hymenoptera",
)


def spec_for(args: argparse.Namespace, seed: int, cache: str) -> dict[str, Any]:
    if args.tiny:
        teacher = {"model": "test_resnet", "weights": "none", "finetune": {"epochs": 2}}
        student = {"model": "test_efficientnet", "weights": "none"}
        train = {"epochs": 4, "batch_size": 16, "lr": 0.05, "image_size": 64, "seed": seed}
    else:
        teacher = {"model": "tf_efficientnet_lite2", "weights": "package", "finetune": {"epochs": 15}}
        student = {"model": "tf_efficientnet_lite0", "weights": "package"}
        train = {"epochs": 15, "batch_size": 64, "lr": 0.01, "image_size": 224, "seed": seed}
    return {
        "teacher": teacher,
        "student": student,
        "dataset": {"path": str(args.data)},
        "distill": {"sp_weight": 3000, "teacher_cache": cache, "teacher_views": args.views},
        "train": train,
        "baseline": False,
    }


def one_run(args: argparse.Namespace, seed: int, cache: str, device: str | None) -> dict[str, Any]:
    from spkd.common.reporter import RecordingReporter
    from spkd.common.spec import JobSpec
    from spkd.models.pipeline import run_job

    spec = JobSpec.model_validate(spec_for(args, seed, cache))
    reporter = RecordingReporter()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        metrics = run_job(spec, args.data, Path(out), reporter, device=device)
    used = any(d.get("teacher_cache") for k, _m, d in reporter.events if k == "info")
    return {
        "seed": seed,
        "cache": cache,
        "cache_used": used,
        "report_acc": metrics["distilled"]["report_acc"],
        "teacher_report_acc": metrics["teacher"]["report_acc"],
        "distill_s": metrics["timing"].get("distill"),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cache in ("off", "on"):
        accs = [r["report_acc"] for r in runs if r["cache"] == cache]
        out[cache] = {
            "accs": accs,
            "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "distill_s": statistics.mean(r["distill_s"] for r in runs if r["cache"] == cache),
        }
    out["diff"] = out["on"]["mean"] - out["off"]["mean"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", type=int, default=None, help="teacher views (default: spec default 8; tiny 2)")
    p.add_argument("--data", type=Path, default=HYMENOPTERA)
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.views is None:
        args.views = 2 if args.tiny else 8
    device = args.device or ("cpu" if args.tiny else None)
    runs = []
    for seed in range(args.seeds):
        for cache in ("off", "on"):
            run = one_run(args, seed, cache, device)
            runs.append(run)
            print(json.dumps(run), flush=True)
    summary = summarise(runs)
    label = "TINY CPU smoke run (random-init tiny models; not an accuracy result)" if args.tiny else ""
    print(label)
    for cache in ("off", "on"):
        s = summary[cache]
        print(
            f"teacher cache {cache:>3}: val acc {100 * s['mean']:.2f} +- {100 * s['std']:.2f} % "
            f"{[round(100 * a, 2) for a in s['accs']]}, distill stage {s['distill_s']:.1f}s"
        )
    print(f"cached - live: {100 * summary['diff']:+.2f} points")
    result = {"tiny": args.tiny, "views": args.views, "runs": runs, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
