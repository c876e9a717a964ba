"""Does distillation pay? N seeds of {baseline, SP at a fixed weight, SP auto, a weight search} on any
ImageFolder, each variant distilled from the same fine-tuned teacher of its seed.

Per seed, one full spkd job fine-tunes the teacher, trains the baseline (the student fine-tuned
alone) and distils with `sp_weight: auto` (the default job). Every other variant is a job that
starts from that job's fine-tuned teacher (`teacher.weights: <its teacher/model.safetensors>`, no
fine-tuning) and trains only the distilled student, with the same seed: same student
initialisation, same data order, same selection split. Accuracies are on the report split (val/,
or test/ when the dataset has one); "shipped" is what the job ships for `auto` (the default job,
models/results/ship.py: the baseline unless the distilled student or the soup earns it on the ship
part), and what the old rule would ship for the other variants (they train no baseline of their own).

The shipping rules, per seed (the default job): what the OLD rule (a strictly higher accuracy on
the whole selection split, at the kept epochs) and the NEW rule (the job's own decision) ship,
and which of the two students is better on the report split. The rule-accuracy count says how
often each rule shipped a student at least as good on the report split as the other student (a
tie on the report split counts as right), and the mean report accuracy of what each rule ships.
Both rules judge the same two trained students (best epochs picked on the pick part); the old
rule's own protocol also picked the epochs on the images it judged on, which only adds to its bias.

Variants (`--variants`): `baseline`, `auto` (the default job), `auto@0.1` (auto with another SP
share), `sp:3000` (a fixed weight), `search:300/1000/3000` (the list search), `layers:blocks.6`
(auto, tapping that layer in both models), and recipes beside SP `auto` (`RECIPES`: `sp+kd`,
`sp+kd-std`, `sp+dist`, `kd`). A job this bench already finished in its --out folder with the same
spec is read back, not rerun: rerun with more --variants to add them to a finished bench. A variant
trains no baseline of its own, so the weak-teacher check (which compares the teacher with the
baseline) lowers the share only in the default job.

    # GPU host: 224 px, 15 epochs, 3 seeds
    python bench/accuracy.py --data ../shared/data/caltech101_22 --out runs/acc-caltech
    # CPU at reduced size (see docs/protocol.md for the measured tables)
    python bench/accuracy.py --data ../shared/data/hymenoptera --image-size 128 --epochs 4 --batch-size 32

`--tiny` runs the same code on the CPU in about a minute (tiny timm models, 32 px, 1 epoch), so CI
keeps the script working.
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
DEFAULT_VARIANTS = ["baseline", "sp:3000", "auto", "search:300/1000/3000"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder (train/ + val/ [+ test/])")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="one job folder per seed/variant")
    p.add_argument("--teacher", default="tf_efficientnet_lite2")
    p.add_argument("--student", default="tf_efficientnet_lite0")
    p.add_argument(
        "--weights", default="package", help="starting weights of both models (hub, package, none)"
    )
    p.add_argument("--epochs", type=int, default=15, help="epochs of each stage")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--teacher-epochs",
        default=None,
        help="teacher.finetune.epochs: a number, or 'auto' (the job default: early stopping on the "
        "selection split); default: --epochs",
    )
    p.add_argument(
        "--teacher-body-lr",
        type=float,
        default=1.0,
        help="teacher.finetune.body_lr_scale: the teacher's pretrained body at this fraction of the lr, "
        "its new head at the lr (default 1.0: one lr, the job default)",
    )
    p.add_argument(
        "--teacher-size",
        default="auto",
        help="teacher.image_size of every job: 'auto' (the job default: the teacher's pretrained size, "
        "at most 2x the student's) or a number of px ('same': --image-size, the old protocol)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny models, 32 px, 1 epoch")
    p.add_argument(
        "--ship-fraction",
        type=float,
        default=0.5,
        help="dataset.ship_fraction of every job: the new rule decides on that share of the selection "
        "split (0: both rules are the old one)",
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="no training: one table from the --json files of runs that each did some seeds "
        "(e.g. one process or host per seed)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.teacher, args.student, args.weights = "test_resnet", "test_efficientnet", "none"
        args.epochs, args.image_size, args.batch_size, args.lr = 1, 32, 32, 0.05
        args.seeds = args.seeds[:2] if len(args.seeds) > 2 else args.seeds
    if args.teacher_epochs not in (None, "auto") and not str(args.teacher_epochs).isdigit():
        raise SystemExit(f"--teacher-epochs {args.teacher_epochs!r}: 'auto' or a number")
    if args.teacher_size not in ("auto", "same") and not args.teacher_size.isdigit():
        raise SystemExit(f"--teacher-size {args.teacher_size!r}: 'auto', 'same' or a number of px")
    for v in args.variants:
        parse_variant(v)  # fail before any training
    return args


# Recipes beside SP `auto`, by name: the distill settings each adds (all `auto` weights).
RECIPES = {
    "sp+kd": {"kd_weight": "auto"},  # SP + Hinton KD, both a share of CE (the paper's SP + KD)
    "sp+kd-std": {"kd_weight": "auto", "kd_standardize": True},  # KD on Z-scored logits (Sun et al. 2024)
    "sp+dist": {"methods": {"dist": {}}},  # SP + DIST (Huang et al., NeurIPS 2022)
    "kd": {"sp_weight": 0.0, "kd_weight": "auto"},  # KD alone, for reference
}


def parse_variant(name: str) -> dict:
    """'auto', 'auto@0.1', 'sp:3000', 'search:300/1000', 'layers:blocks.6', 'baseline', or a recipe
    of RECIPES ('sp+kd', ...) -> settings."""
    if name in ("baseline", "auto"):
        return {}
    if name in RECIPES:
        return {"distill": RECIPES[name]}
    kind, _, value = name.partition(":") if ":" in name else name.partition("@")
    if name.startswith("auto@"):
        return {"share": float(value)}
    if kind == "sp":
        return {"distill": {"sp_weight": float(value)}}
    if kind == "search":
        return {"distill": {"sp_weight": [float(w) for w in value.split("/")]}}
    if kind == "layers":
        return {"distill": {"layers": [{"teacher": value, "student": value}]}}
    raise SystemExit(
        f"unknown variant {name!r}: baseline, auto, auto@SHARE, sp:W, search:W1/W2, layers:NAME, "
        + ", ".join(RECIPES)
    )


def job_spec(
    args: argparse.Namespace, seed: int, teacher_file: Path | None = None, distill: dict | None = None
):
    from spkd.common.spec import JobSpec

    size = getattr(args, "teacher_size", "auto")
    size = args.image_size if size == "same" else size if size == "auto" else int(size)
    epochs = getattr(args, "teacher_epochs", None) or args.epochs
    epochs = epochs if epochs == "auto" else int(epochs)
    finetune = {"epochs": epochs, "body_lr_scale": getattr(args, "teacher_body_lr", 1.0)}
    teacher = {"model": args.teacher, "weights": args.weights, "finetune": finetune}
    if teacher_file is not None:  # a variant: the seed's fine-tuned teacher, as it is
        teacher = {"model": args.teacher, "weights": str(teacher_file)}
    teacher["image_size"] = size
    return JobSpec.model_validate(
        {
            "teacher": teacher,
            "student": {"model": args.student, "weights": args.weights},
            "dataset": {"path": str(args.data), "ship_fraction": getattr(args, "ship_fraction", 0.5)},
            "distill": {"layers": "auto", **(distill or {})},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "image_size": args.image_size,
                "seed": seed,
            },
            "baseline": teacher_file is None,
        }
    )


def _run(args, spec, out: Path, share: float | None = None) -> tuple[dict, float]:
    """(metrics, seconds) of one job; a job this bench already finished in `out` with the very same
    spec and share is read back, not rerun (so variants can be added to a bench later)."""
    from spkd.common.reporter import NullReporter
    from spkd.models.pipeline import run_job
    from spkd.models.training import autoweight

    done, seconds_file = out / "metrics.json", out / "bench_seconds.json"
    if done.is_file() and seconds_file.is_file():
        saved = json.loads(done.read_text())
        timing = json.loads(seconds_file.read_text())
        if saved.get("spec") == spec.model_dump(mode="json") and timing.get("share") == share:
            return saved, timing["seconds"]
    default = autoweight.SP_SHARE
    if share is not None:
        autoweight.SP_SHARE = share
    start = time.perf_counter()
    try:
        metrics = run_job(spec, args.data, out, NullReporter(), args.device)
    finally:
        autoweight.SP_SHARE = default
    seconds = round(time.perf_counter() - start, 1)
    seconds_file.write_text(json.dumps({"seconds": seconds, "share": share}))
    return metrics, seconds


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """One seed: the default job, then every other variant from its fine-tuned teacher."""
    from spkd.models.stages.evaluate import distilled_wins  # the job's own shipping rule

    base_dir = args.out / f"seed{seed}" / "auto"
    base, seconds = _run(args, job_spec(args, seed), base_dir)
    baseline = base["baseline"]
    row = {
        "seed": seed,
        "device": base["device"],
        "teacher": base["teacher"]["report_acc"],
        "report_n": base["protocol"]["sizes"]["report"],
        "variants": {"baseline": {"acc": baseline["report_acc"], "shipped": baseline["report_acc"]}},
        "seconds": {"auto": seconds},
        "rules": rules(base),
        "teacher_vs_student": teacher_vs_student(base),
    }
    for name in args.variants:
        if name == "baseline":
            continue
        if name == "auto":
            metrics = base
        else:
            settings = parse_variant(name)
            spec = job_spec(args, seed, base_dir / "teacher" / "model.safetensors", settings.get("distill"))
            metrics, row["seconds"][name] = _run(
                args, spec, args.out / f"seed{seed}" / _slug(name), settings.get("share")
            )
        d = metrics["distilled"]
        if name == "auto":
            shipped = metrics[metrics["shipped"]]["report_acc"]
        else:  # no baseline of its own: the old rule against the seed's baseline
            ships_baseline = d.get("select_acc") is not None and not distilled_wins(baseline, d)
            shipped = baseline["report_acc"] if ships_baseline else d["report_acc"]
        row["variants"][name] = {
            "acc": d["report_acc"],
            "shipped": shipped,
            "sp_weight": (metrics.get("distill_weights") or {}).get("sp", {}).get("weight"),
        }
    return row


def rules(metrics: dict) -> dict:
    """What the old and the new rule ship for one default job, and the report split's verdict:
    {"old", "new", "report" ({student: report accuracy}), "report_better" (of baseline and
    distilled; "tie" when equal), "old_right", "new_right" (the shipped student's report accuracy
    >= the other student's)}."""
    report = {w: metrics[w]["report_acc"] for w in ("baseline", "distilled", "soup") if metrics.get(w)}
    old = (metrics.get("old_rule_shipped") or {}).get("student") or metrics["shipped"]
    new = metrics["shipped"]
    b, d = report["baseline"], report["distilled"]
    better = "tie" if b == d else ("distilled" if d > b else "baseline")
    best = max(b, d)
    return {
        "old": old,
        "new": new,
        "report": report,
        "report_better": better,
        "old_right": report[old] >= best,
        "new_right": report[new] >= best,
    }


def teacher_vs_student(metrics: dict) -> dict:
    """The fine-tuned teacher against the student fine-tuned alone in one default job: {"teacher",
    "baseline"} (report accuracy), {"teacher_select", "baseline_select"} (selection accuracy, what the
    weak-teacher check compares), "weak" (the check fired), "sp_share" (SP's auto share of CE used)
    and "teacher_epochs" (the epochs the teacher stage trained; its best epoch "teacher_best_epoch")."""
    check = (metrics.get("distill_weights") or {}).get("teacher_check") or {}
    sp = (metrics.get("distill_weights") or {}).get("sp") or {}
    teacher = metrics.get("teacher") or {}
    return {
        "teacher": teacher.get("report_acc"),
        "baseline": metrics["baseline"]["report_acc"],
        "teacher_select": check.get("teacher_select_acc"),
        "baseline_select": check.get("baseline_select_acc"),
        "weak": bool(check) and not check.get("teacher_better", True),
        "sp_share": sp.get("share"),
        "teacher_epochs": teacher.get("epochs"),
        "teacher_best_epoch": teacher.get("best_epoch"),
    }


def teacher_table(rows: list[dict]) -> str:
    """Per seed: the teacher against the student alone on the report and the selection (pick) split,
    whether the weak-teacher check fired and the SP share the default job used."""
    lines = [
        "| seed | teacher, report | student alone, report | teacher - student | teacher, selection | "
        "student alone, selection | weak-teacher check | SP share | teacher epochs (best) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}"

    for r in rows:
        t = r.get("teacher_vs_student")
        if not t:
            continue
        gap = "n/a" if t["teacher"] is None else f"{100 * (t['teacher'] - t['baseline']):+.2f}"
        share = "n/a" if t["sp_share"] is None else f"{t['sp_share']:g} x CE"
        cells = [pct(t["teacher"]), pct(t["baseline"]), gap, pct(t["teacher_select"])]
        cells += [pct(t["baseline_select"]), "fired" if t["weak"] else "no", share]
        cells.append(f"{t['teacher_epochs']} ({t['teacher_best_epoch']})")
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rules_table(rows: list[dict]) -> str:
    """Per seed: report accuracies, what each rule ships, the report-better student; then the
    rule-accuracy counts and the mean report accuracy of what each rule ships."""
    lines = [
        "| seed | baseline | distilled | soup | report-better | old rule ships | new rule ships |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        x = r["rules"]
        soup = x["report"].get("soup")
        lines.append(
            f"| {r['seed']} | {100 * x['report']['baseline']:.2f} | {100 * x['report']['distilled']:.2f} | "
            f"{'n/a' if soup is None else f'{100 * soup:.2f}'} | {x['report_better']} | "
            f"{x['old']}{_wrong(x['old_right'])} | {x['new']}{_wrong(x['new_right'])} |"
        )
    n = len(rows)
    old_ok = sum(r["rules"]["old_right"] for r in rows)
    new_ok = sum(r["rules"]["new_right"] for r in rows)
    old_acc = [100 * r["rules"]["report"][r["rules"]["old"]] for r in rows]
    new_acc = [100 * r["rules"]["report"][r["rules"]["new"]] for r in rows]
    lines += [
        "",
        f"Rule accuracy (shipped a student at least as good on the report split as the other): "
        f"old rule {old_ok}/{n}, new rule {new_ok}/{n}",
        f"Report accuracy of what ships, mean +- std: old rule {_ms(old_acc)}, new rule {_ms(new_acc)}",
    ]
    return "\n".join(lines)


def _wrong(right: bool) -> str:
    return "" if right else " (wrong)"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} +- {sd:.2f}"


def summarise(rows: list[dict], variants: list[str]) -> dict[str, dict[str, list[float]]]:
    """{variant: {"acc": [...], "shipped": [...], "diff": [...] (acc - baseline, points)}} over seeds."""
    out = {}
    for name in ["baseline", *[v for v in variants if v != "baseline"]]:
        acc = [100 * r["variants"][name]["acc"] for r in rows]
        shipped = [100 * r["variants"][name]["shipped"] for r in rows]
        base = [100 * r["variants"]["baseline"]["acc"] for r in rows]
        out[name] = {"acc": acc, "shipped": shipped, "diff": [a - b for a, b in zip(acc, base, strict=True)]}
    return out


def table(rows: list[dict], args: argparse.Namespace) -> str:
    names = ["baseline", *[v for v in args.variants if v != "baseline"]]
    s = summarise(rows, args.variants)
    lines = [
        f"{args.teacher} -> {args.student}, {args.weights} weights, {args.image_size} px, {args.epochs} "
        f"epochs/stage, batch {args.batch_size}, data {args.data.name} (report split: {rows[0]['report_n']} "
        f"images, one image = {100 / rows[0]['report_n']:.2f} points), device {rows[0]['device']}",
        "",
        "| seed | teacher | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = [f"{100 * r['variants'][n]['acc']:.2f}" for n in names]
        lines.append(f"| {r['seed']} | {100 * r['teacher']:.2f} | " + " | ".join(cells) + " |")
    teacher = _ms([100 * r["teacher"] for r in rows])
    lines.append(f"| mean +- std | {teacher} | " + " | ".join(_ms(s[n]["acc"]) for n in names) + " |")
    lines.append("| shipped, mean +- std | | " + " | ".join(_ms(s[n]["shipped"]) for n in names) + " |")
    lines += ["", "Paired difference to the baseline, points (per seed; mean +- std):", ""]
    for n in names[1:]:
        per = ", ".join(f"{d:+.2f}" for d in s[n]["diff"])
        ship = ", ".join(f"{a - b:+.2f}" for a, b in zip(s[n]["shipped"], s["baseline"]["acc"], strict=True))
        lines.append(f"- {n}: distilled {per} ({_ms(s[n]['diff'])}); shipped {ship}")
    if all("rules" in r for r in rows):
        lines += ["", "Shipping rules (the default job of each seed):", "", rules_table(rows)]
    if all("teacher_vs_student" in r for r in rows):
        lines += ["", "The teacher against the student alone (the default job of each seed):", ""]
        lines.append(teacher_table(rows))
    return "\n".join(lines)


def write_json(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    """The rows so far, their summary and the run's arguments (rewritten after every seed, so an
    interrupted run keeps the seeds it finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "merge"}
    path.write_text(
        json.dumps({"rows": rows, "summary": summarise(rows, args.variants), "args": saved}, indent=2)
    )


def merge(files: list[Path]) -> tuple[list[dict], argparse.Namespace]:
    """Rows of several --json files (one seed each, or several), as one run. SystemExit when they
    are not runs of the same settings or repeat a seed."""
    rows, first = [], None
    for f in files:
        saved = json.loads(f.read_text())
        settings = {k: v for k, v in saved["args"].items() if k not in ("seeds", "json", "out")}
        if first is None:
            first = settings
        elif settings != first:
            diff = sorted(k for k in settings.keys() | first.keys() if settings.get(k) != first.get(k))
            raise SystemExit(f"{f}: not the same settings as {files[0]} ({', '.join(diff)})")
        rows += saved["rows"]
    seeds = [r["seed"] for r in rows]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"a seed appears twice among the merged files: {sorted(seeds)}")
    assert first is not None
    args = argparse.Namespace(**{**first, "data": Path(first["data"]), "seeds": sorted(seeds)})
    return sorted(rows, key=lambda r: r["seed"]), args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        rows, merged = merge(args.merge)
        print(table(rows, merged))
        if args.json:
            write_json(args.json, rows, merged)
        return 0
    if args.tiny:
        import torch

        torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(args, seed))
        print(f"seed {seed}: {json.dumps(rows[-1])}", flush=True)
        if args.json:
            write_json(args.json, rows, args)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
