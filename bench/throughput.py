"""Distillation throughput: spkd's engine against a hand-written loop and the GPU limit.

For each (teacher, student) pair, in one run on one device, at one image size and batch size:

  (a) naive   a plain fp32 loop a user would script: NCHW, default SGD, loss.item() every step,
              random data already on the device (the anchor "naive fp32 loop", bench/README.md)
  (b) limit   bf16 autocast + channels_last + fused SGD, no host syncs: teacher inference + student
              train step on random data on the device; the most any data path can reach
  (s) student the student train step alone (same settings as b): what a teacher cache aims for
  (c) spkd    the engine end to end (models.pipeline.run_job) from JPEG files on disk, decode and
              augmentation included, teacher cache off; steady-state distill epochs
  (d) cached  the same with the teacher-feature cache on; steady-state distill epochs (the cache
              build is reported separately, and in an "incl. build" rate over all epochs)

It prints images/s, the ratios c/a, c/b, d/b, d/s and peak GPU memory, and writes JSON (--json).
`--devices N` instead runs only (c) on 1 and on N devices (one job over N ranks, train.devices) and
prints the throughput of each, the speedup and the scaling efficiency, N-rate / (N x 1-rate); on the
CPU the N ranks are gloo processes (CI keeps it working; those numbers are not results).
`--compile both` measures (b) and (s) with and without torch.compile. `--tiny` runs tiny timm
models on the CPU with a few steps, so CI keeps this script working (no timing targets there).

    python bench/throughput.py                      # GPU host: the three anchor pairs at 224 px
    python bench/throughput.py --tiny --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_PAIRS = [
    ("resnet50", "mobilenetv3_large_100"),
    ("convnext_small", "resnet18"),
    ("efficientnet_lite2", "efficientnet_lite0"),
]
TINY_PAIRS = [("test_resnet", "test_efficientnet"), ("test_convnext", "test_byobnet")]
# ../shared/data (this workspace) or shared/data inside the checkout (a copied working tree).
HYMENOPTERA = next(
    (
        p
        for p in (ROOT.parent / "shared" / "data" / "hymenoptera", ROOT / "shared" / "data" / "hymenoptera")
        if p.is_dir()
    ),
    ROOT.parent / "shared" / "data" / "hymenoptera",
)
NUM_CLASSES = 2  # a user's target set; the head size barely matters for speed


# ------------------------------------------------------------------------------------ helpers
def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Tung & Mori SP term, written out as a user would (Tung & Mori, ICCV 2019, eq. 2-4)."""
    b = f_s.shape[0]
    g_s = F.normalize(f_s.reshape(b, -1).float() @ f_s.reshape(b, -1).float().t(), dim=1)
    g_t = F.normalize(f_t.reshape(b, -1).float() @ f_t.reshape(b, -1).float().t(), dim=1)
    return ((g_t - g_s) ** 2).sum() / (b * b)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)


def timed(step: Callable[[], Any], device: torch.device, batch: int, steps: int, warmup: int) -> float:
    """Images per second of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def build(name: str, device: torch.device, channels_last: bool) -> torch.nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def fused_sgd(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.SGD(model.parameters(), **kwargs)


def amp(device: torch.device):
    """bf16 autocast on GPUs; the CPU stays fp32 like the engine's `precision: auto`."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ------------------------------------------------------------------------ (a), (b), (s) loops
def naive_loop(teacher_name: str, student_name: str, args, device: torch.device) -> dict:
    teacher = build(teacher_name, device, False).eval()
    student = build(student_name, device, False).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)

    def step() -> float:
        with torch.no_grad():
            f_t = teacher.forward_features(x)
        f_s = student.forward_features(x)
        loss = F.cross_entropy(student.forward_head(f_s), y) + 3000 * sp_loss(f_s, f_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()  # the per-step host sync a hand-written loop usually has

    reset_peak(device)
    rate = timed(step, device, args.batch, args.steps, args.warmup)
    return {"img_s": rate, "gpu_gib": peak_gib(device)}


def limit_loop(
    teacher_name: str | None, student_name: str, args, device: torch.device, compiled: bool
) -> dict:
    """bf16 + channels_last + fused SGD on random device data; teacher_name None: student alone."""
    cl = device.type == "cuda"
    student = build(student_name, device, cl).train()
    teacher = build(teacher_name, device, cl).eval() if teacher_name else None
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = fused_sgd(student, device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)

    def forward_loss() -> torch.Tensor:
        with amp(device):
            f_s = student.forward_features(x)
            loss = F.cross_entropy(student.forward_head(f_s).float(), y)
            if teacher is not None:
                with torch.no_grad():
                    f_t = teacher.forward_features(x)
                loss = loss + 3000 * sp_loss(f_s, f_t)
        return loss

    fwd = torch.compile(forward_loss) if compiled else forward_loss

    def step() -> None:
        loss = fwd()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reset_peak(device)
    warmup = args.warmup + (3 if compiled else 0)  # compilation happens in the first calls
    rate = timed(step, device, args.batch, args.steps, warmup)
    return {"img_s": rate, "gpu_gib": peak_gib(device)}


# ------------------------------------------------------------------------------- (c), (d) engine
def make_dataset(root: Path, n_images: int, source: Path | None) -> Path:
    """An ImageFolder of n JPEGs: hard links to a real dataset's photos, else generated JPEGs."""
    from PIL import Image

    photos = sorted(source.glob("train/*/*.jpg")) if source and source.is_dir() else []
    for split, n in (("train", n_images), ("val", max(8, n_images // 8))):
        for c in range(NUM_CLASSES):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            dest = root / split / f"class{i % NUM_CLASSES}" / f"{i:06d}.jpg"
            if photos:
                try:
                    os.link(photos[i % len(photos)], dest)  # no copy: the same bytes, decoded anew
                except OSError:
                    shutil.copyfile(photos[i % len(photos)], dest)
            else:
                g = torch.Generator().manual_seed(i)
                small = torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8, generator=g)
                big = F.interpolate(small[None].float(), size=(375, 500), mode="bicubic")[0]
                noise = torch.randn(big.shape, generator=g) * 8
                pixels = (big + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(dest, quality=90)
    return root


def engine_run(
    teacher_name: str,
    student_name: str,
    args,
    device: torch.device,
    data_dir: Path,
    cache: str,
    data_path: str = "auto",
    devices: int = 1,
) -> dict:
    """run_job on JPEGs on disk; steady-state distill img/s from the engine's own epoch_end events
    (with `devices` > 1: the job's global rate over all its ranks)."""
    from spkd.common.reporter import RecordingReporter
    from spkd.common.spec import JobSpec
    from spkd.models.pipeline import run_job

    spec = JobSpec.model_validate(
        {
            "teacher": {"model": teacher_name, "weights": "none"},
            "student": {"model": student_name, "weights": "none"},
            "dataset": {"path": str(data_dir)},
            "distill": {"teacher_cache": cache, "teacher_views": args.views},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch,
                "image_size": args.size,
                "precision": "auto",
                "num_workers": args.workers,
                "devices": devices,
            },
            "baseline": False,
        }
    )
    reporter = RecordingReporter()
    reset_peak(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_job(spec, data_dir, Path(out), reporter, device=str(device), data_path=data_path)
    wall = time.perf_counter() - start
    epochs = [d for k, _m, d in reporter.events if k == "epoch_end" and d["stage"] == "distill"]
    infos = [d for k, _m, d in reporter.events if k == "info"]
    rates = [e["images_per_sec"] for e in epochs]
    steady = rates[1:] or rates  # epoch 1 carries one-off costs (cuDNN autotune, allocator)
    build_s = next((d["seconds"] for d in infos if d.get("teacher_cache")), 0.0)
    decode_s = next((d["decode_seconds"] for d in infos if "decode_seconds" in d), None)
    per_epoch = args.images // args.batch * args.batch  # the engine drops the short last batch
    train_s = sum(per_epoch / r for r in rates)
    return {
        "img_s": statistics.median(steady),
        "epoch_img_s": [round(r, 1) for r in rates],
        "cache_build_s": round(build_s, 2) if cache == "on" else None,
        "cache_on": any(d.get("teacher_cache") for d in infos),
        "incl_build_img_s": per_epoch * len(rates) / max(train_s + build_s, 1e-9),
        # over all E epochs with the one-off costs (decode once, cache build) included
        "incl_oneoff_img_s": per_epoch * len(rates) / max(train_s + build_s + (decode_s or 0.0), 1e-9),
        "decode_s": decode_s,
        "data_path": next((d["data_path"] for d in infos if "data_path" in d), "loader"),
        "wall_s": round(wall, 1),
        "gpu_gib": peak_gib(device),
    }


# ----------------------------------------------------------------------------------- the table
def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def scaling_pair(teacher: str, student: str, args, device: torch.device, data_dir: Path) -> dict:
    """--devices N: the engine (teacher cache off) on 1 device and on N; scaling efficiency is
    throughput at N / (N x throughput at 1)."""
    row: dict[str, Any] = {"teacher": teacher, "student": student, "devices": args.devices}
    for n in (1, args.devices):
        start = time.perf_counter()
        row[f"c_{n}"] = engine_run(teacher, student, args, device, data_dir, "off", devices=n)
        print(f"    {n} device(s): {row[f'c_{n}']['img_s']:.1f} img/s ({time.perf_counter() - start:.0f}s)")
    one, many = row["c_1"]["img_s"], row[f"c_{args.devices}"]["img_s"]
    row["speedup"] = ratio(many, one)
    row["efficiency"] = ratio(many, args.devices * one)
    return row


def print_scaling(result: dict) -> None:
    n = result["devices"]
    print(f"\ndevice: {result['device']}  size {result['size']}  global batch {result['batch']}  devices {n}")
    cols = ["1 device", f"{n} devices", "speedup", "efficiency"]
    print(f"{'pair':<44}" + "".join(f"{c:>12}" for c in cols))
    for row in result["rows"]:
        pair = f"{row['teacher']} -> {row['student']}"
        cells = [fmt(row["c_1"]["img_s"], 1), fmt(row[f"c_{n}"]["img_s"], 1)]
        cells += [fmt(row["speedup"], 2), fmt(row["efficiency"], 2)]
        print(f"{pair:<44}" + "".join(f"{c:>12}" for c in cells))


def run_pair(teacher: str, student: str, args, device: torch.device, data_dir: Path) -> dict:
    if args.devices > 1:
        return scaling_pair(teacher, student, args, device, data_dir)
    row: dict[str, Any] = {"teacher": teacher, "student": student}
    row["a_naive"] = naive_loop(teacher, student, args, device)
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compiled in variants:
        suffix = "_compiled" if compiled else ""
        row["b_limit" + suffix] = limit_loop(teacher, student, args, device, compiled)
        row["s_student" + suffix] = limit_loop(None, student, args, device, compiled)
    runs = [("c_spkd", "off"), ("d_cached", "on")]
    if args.with_loader:
        runs.append(("c_loader", "off"))
    for key, cache in runs:
        start = time.perf_counter()
        data_path = "loader" if key == "c_loader" else "auto"
        row[key] = engine_run(teacher, student, args, device, data_dir, cache, data_path)
        print(f"    {key}: {row[key]['img_s']:.1f} img/s ({time.perf_counter() - start:.0f}s)", flush=True)
    b = row.get("b_limit", row.get("b_limit_compiled"))["img_s"]
    s = row.get("s_student", row.get("s_student_compiled"))["img_s"]
    c, d = row["c_spkd"]["img_s"], row["d_cached"]["img_s"]
    row["ratios"] = {
        "c/a": ratio(c, row["a_naive"]["img_s"]),
        "c/b": ratio(c, b),
        "d/b": ratio(d, b),
        "d/s": ratio(d, s),
    }
    return row


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(result: dict) -> None:
    cols = ["a naive", "b limit", "s student", "c spkd", "d cached", "c/a", "c/b", "d/b", "d/s", "GiB b/c/d"]
    print(
        f"\ndevice: {result['device']}  size {result['size']}  batch {result['batch']}  "
        f"compile {result['compile']}  torch {result['torch']}"
    )
    print(f"{'pair':<44}" + "".join(f"{c:>11}" for c in cols))
    for row in result["rows"]:
        pair = f"{row['teacher']} -> {row['student']}"
        b = row.get("b_limit", row.get("b_limit_compiled"))
        s = row.get("s_student", row.get("s_student_compiled"))
        r = row["ratios"]
        mem = "/".join(fmt(x["gpu_gib"], 1) for x in (b, row["c_spkd"], row["d_cached"]))
        cells = [
            fmt(row["a_naive"]["img_s"], 1),
            fmt(b["img_s"], 1),
            fmt(s["img_s"], 1),
            fmt(row["c_spkd"]["img_s"], 1),
            fmt(row["d_cached"]["img_s"], 1),
            fmt(r["c/a"], 2),
            fmt(r["c/b"], 2),
            fmt(r["d/b"], 2),
            fmt(r["d/s"], 2),
            mem,
        ]
        print(f"{pair:<44}" + "".join(f"{c:>11}" for c in cells))
        if "b_limit_compiled" in row and "b_limit" in row:
            print(
                f"{'  torch.compile: b / s':<44}{fmt(row['b_limit_compiled']['img_s'], 1):>11}"
                f"{fmt(row['s_student_compiled']['img_s'], 1):>11}   (eager above)"
            )
        d = row["d_cached"]
        if "c_loader" in row:
            loader = row["c_loader"]
            print(
                f"{'  c with the multi-worker DataLoader':<44}{fmt(loader['img_s'], 1):>11} img/s "
                f"(c/c_loader {fmt(ratio(row['c_spkd']['img_s'], loader['img_s']), 2)})"
            )
        print(
            f"{'  engine detail':<44} data path {row['c_spkd']['data_path']}, decode "
            f"{fmt(row['c_spkd']['decode_s'], 1)}s; c epochs {row['c_spkd']['epoch_img_s']}; "
            f"d epochs {d['epoch_img_s']}, cache {'on' if d['cache_on'] else 'OFF'} "
            f"build {fmt(d['cache_build_s'], 1)}s, d incl. build {fmt(d['incl_build_img_s'], 1)} img/s; "
            f"all epochs incl. decode (+build): c {fmt(row['c_spkd']['incl_oneoff_img_s'], 1)}, "
            f"d {fmt(d['incl_oneoff_img_s'], 1)} img/s"
        )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny timm models on the CPU, a few steps (CI)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--pairs", default=None, help="teacher:student,teacher:student (default: per mode)")
    p.add_argument("--size", type=int, default=None, help="image size (224; tiny: 64)")
    p.add_argument("--batch", type=int, default=None, help="batch size (128; tiny: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps for a/b/s (50; tiny: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (10; tiny: 1)")
    p.add_argument("--images", type=int, default=None, help="JPEGs for c/d (4096; tiny: 32)")
    p.add_argument("--epochs", type=int, default=None, help="distill epochs for c/d (4; tiny: 3)")
    p.add_argument("--views", type=int, default=2, help="teacher-cache views per image for d")
    p.add_argument("--workers", type=int, default=None, help="decode threads / loader workers")
    p.add_argument("--compile", choices=["off", "on", "both"], default=None, help="(both; tiny: off)")
    p.add_argument("--with-loader", action="store_true", help="also c through the DataLoader fallback")
    p.add_argument("--data", type=Path, default=None, help="ImageFolder whose train photos to reuse")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="N > 1: only the engine, on 1 and on N devices (GPUs; gloo ranks on the CPU): "
        "throughput and scaling efficiency",
    )
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "size": (64, 224),
        "batch": (8, 128),
        "steps": (3, 50),
        "warmup": (1, 10),
        "images": (32, 4096),
        "epochs": (3, 4),
        "compile": ("off", "both"),
    }
    for key, (small, big) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else big)
    if args.pairs:
        args.pair_list = [tuple(p.split(":", 1)) for p in args.pairs.split(",")]
    else:
        args.pair_list = TINY_PAIRS if tiny else GPU_PAIRS
    if args.data is None and HYMENOPTERA.is_dir():
        args.data = HYMENOPTERA
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "tiny": args.tiny,
        "size": args.size,
        "batch": args.batch,
        "compile": args.compile,
        "torch": torch.__version__,
        "images": args.images,
        "epochs": args.epochs,
        "views": args.views,
        "devices": args.devices,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="spkd-bench-") as tmp:
        data_dir = make_dataset(Path(tmp) / "data", args.images, args.data)
        for teacher, student in args.pair_list:
            print(f"... {teacher} -> {student}", flush=True)
            result["rows"].append(run_pair(teacher, student, args, device, data_dir))
    (print_scaling if args.devices > 1 else print_table)(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
