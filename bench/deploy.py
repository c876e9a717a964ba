"""The deploy table of a finished job, measured again side by side in one run on this machine, the
int8 student's agreement with fp32 on the report images, and (with --predict) the latency of
POST /v1/jobs/{id}/predict against a real `spkd serve` at 1 and N concurrent clients.

    .venv/bin/python bench/deploy.py JOB_DIR_OR_ID [--data REPORT_DIR] [--predict] [--clients 1 8]
        [--requests 40] [--images 1] [--threads 1] [--json out.json]

JOB_DIR is a job's output folder (metrics.json, student/, teacher/, student.onnx, ...: `spkd run
--out`, or the attempt folder under the artifact root); a job id is looked up in the Redis of
SPKD_REDIS_URL / SPKD_REDIS_PREFIX and read from SPKD_ARTIFACT_ROOT (not from a bucket).

Parameters and FLOPs are recounted (torch.utils.flop_counter.FlopCounterMode) from the hub folders
loaded with timm; the teacher and the other student are exported to ONNX in a temporary folder as the
job did; every ONNX file is timed round-robin with onnxruntime (models/results/deploy.py). Accuracies
are the job's own (metrics.json), the int8 agreement is recomputed on the report images (REPORT_DIR:
class folders; default: the job's dataset folder's report split when it is a folder of its own).
Nothing here is a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def job_folder(arg: str) -> Path:
    """A job's output folder from a path, or from a job id through the service's settings."""
    path = Path(arg)
    if (path / "metrics.json").is_file():
        return path
    from spkd.core import attempts, store
    from spkd.core.settings import Settings

    settings = Settings()
    job = store.get_job(store.connect(settings.redis_url), store.Keys(settings.redis_prefix), arg)
    if job is None or job["status"] != "succeeded":
        sys.exit(f"{arg}: neither a job folder with metrics.json nor a succeeded job in {settings.redis_url}")
    folder = attempts.output_dir(Path(settings.artifact_root).resolve() / arg, job.get("output"))
    if not (folder / "metrics.json").is_file():
        sys.exit(f"{arg}: no metrics.json in {folder} (a job in a bucket is not supported here)")
    return folder


def report_images(folder: Path, metrics: dict, data: Path | None) -> tuple[list[Path], list[int]]:
    """(paths, labels) of the report split: REPORT_DIR's class folders, or the job's dataset folder's
    report split (`val/`, `test/`) when the job had one. Labels follow the job's class order."""
    classes = metrics["dataset"]["classes"]
    if data is None:
        split = str(metrics["protocol"]["report"]).rstrip("/")
        base = Path((metrics["spec"]["dataset"] or {}).get("path") or "")
        data = base / split
        if split not in ("val", "valid", "validation", "test") or not data.is_dir():
            return [], []
    paths, labels = [], []
    for label, name in enumerate(classes):
        for p in sorted((data / name).glob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(label)
    return paths, labels


def measure(folder: Path, threads: int) -> dict:
    """The deploy block again, measured now: counts from the hub folders, ONNX latencies round-robin."""
    import timm
    import torch

    from spkd.models.networks.factory import create_kwargs
    from spkd.models.results import deploy, export
    from spkd.models.results.latency import cpu_latency

    metrics = json.loads((folder / "metrics.json").read_text())
    size = int(metrics["image_size"])
    old = metrics.get("deploy") or {}
    shipped = metrics["shipped"]
    roles = {"teacher": "teacher", "student": "student"}
    if shipped != "baseline" and (folder / "baseline").is_dir():
        roles["baseline"] = "baseline"
    acc = {
        "teacher": (metrics.get("teacher") or {}).get("report_acc"),
        "student": metrics[shipped]["report_acc"],
        "baseline": (metrics.get("baseline") or {}).get("report_acc"),
    }
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="spkd-deploy-bench-") as tmp:
        onnx = {"student": folder / "student.onnx"}
        for role, sub in roles.items():
            cfg = json.loads((folder / sub / "config.json").read_text())
            model = timm.create_model(
                f"local-dir:{folder / sub}", pretrained=True, **create_kwargs(cfg["architecture"], size)
            ).eval()
            row = {
                "model": cfg["architecture"],
                "accuracy": acc[role],
                "params": deploy.param_count(model),
                "flops": deploy.count_flops(model, size),
                "weights_bytes": (folder / sub / "model.safetensors").stat().st_size,
            }
            row["macs"] = row["flops"] // 2
            if role != "student":
                onnx[role] = Path(tmp) / f"{role}.onnx"
                with torch.no_grad():
                    export.export_onnx(model, size, onnx[role])
            row["onnx_bytes"] = onnx[role].stat().st_size
            rows[role] = row
        rows["student"]["trained"] = shipped
        int8 = copy.deepcopy(old.get("int8"))
        if (folder / deploy.INT8_FILE).is_file():
            onnx["student_int8"] = folder / deploy.INT8_FILE
        latency = cpu_latency(onnx, size, threads=threads)
    for role, row in rows.items():
        row["latency_ms"] = latency[role]
    if isinstance(int8, dict) and "student_int8" in latency:
        int8["latency_ms"] = latency["student_int8"]
        int8["speedup_vs_fp32"] = round(latency["student"]["p50"] / latency["student_int8"]["p50"], 4)
    return {
        "image_size": size,
        "flops_counter": deploy.FLOPS_COUNTER,
        "cpu": deploy.cpu_info(threads),
        "gpu": None,
        "models": rows,
        "student_vs_teacher": deploy.summarise(rows),
        "int8": int8,
    }


def int8_agreement(folder: Path, paths: list[Path], labels: list[int]) -> dict | None:
    """fp32 and int8 ONNX on the report images (common.preprocess, as the API feeds them):
    accuracies and how often their top-1 agree."""
    if not paths or not (folder / "student.int8.onnx").is_file():
        return None
    import numpy as np

    from spkd.common.decode import load_rgb
    from spkd.common.preprocess import EvalConfig, eval_batch
    from spkd.models.results.deploy import onnx_predict
    from spkd.models.results.latency import onnx_session

    cfg = EvalConfig.from_hub_config(json.loads((folder / "student" / "config.json").read_text()))
    batches = [eval_batch([load_rgb(p) for p in paths[i : i + 32]], cfg) for i in range(0, len(paths), 32)]
    fp32 = np.array(onnx_predict(onnx_session(folder / "student.onnx"), batches))
    int8 = np.array(onnx_predict(onnx_session(folder / "student.int8.onnx"), batches))
    y = np.array(labels)
    return {
        "images": len(paths),
        "fp32_accuracy": float((fp32 == y).mean()),
        "int8_accuracy": float((int8 == y).mean()),
        "agreement": float((fp32 == int8).mean()),
    }


# ---------------------------------------------------------------- predict through the API


def predict_bench(
    folder: Path, paths: list[Path], clients: list[int], requests: int, images: int
) -> list[dict]:
    """A real `spkd serve` with the job registered as finished (its files copied into an attempt
    folder); per client count, `requests` predict calls of `images` images each, after one warm-up
    call that loads the model. SPKD_PREDICT_CONCURRENCY is the largest client count."""
    import httpx
    import redis
    from service import KEY, pct, procs, sandbox, service_env, start_service

    from spkd.common.files import manifest
    from spkd.core import store

    if not paths:
        from PIL import Image

        tmp_img = Path(tempfile.mkdtemp()) / "grey.png"
        Image.new("RGB", (320, 240), (128, 128, 128)).save(tmp_img)
        paths = [tmp_img]
    redis_url = "redis://127.0.0.1:6379/0"
    results = []
    with sandbox("deploy", redis_url) as (tmp, prefix):
        env = service_env(redis_url, prefix, prefix, tmp)
        env["SPKD_PREDICT_CONCURRENCY"] = str(max(clients))
        r, keys = redis.Redis.from_url(redis_url, decode_responses=True), store.Keys(prefix)
        job = store.create_job(
            r, keys, store.owner_of(KEY), json.loads((folder / "metrics.json").read_text())["spec"]
        )
        dest = tmp / "artifacts" / job["id"] / "attempt-00000001"
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", ".*"))
        store.transition(
            r, keys, job["id"], store.SUCCEEDED, [store.QUEUED], artifacts=manifest(dest),
            output=dest.name, metrics=json.loads((folder / "metrics.json").read_text()),
        )  # fmt: skip
        group = procs.Group(tmp / "logs", cwd=ROOT, grace_s=10)
        try:
            url = start_service(group, procs.free_port(), env, worker=False, timeout_s=60)
            body = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths[:images]]
            while len(body) < images:
                body += body[: images - len(body)]
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
                warm = c.post(f"/v1/jobs/{job['id']}/predict", files=body)
                if warm.status_code != 200:
                    raise RuntimeError(f"predict: {warm.status_code} {warm.text[:300]}")
            for n in clients:
                lat, wall, refused = asyncio.run(_load(url, job["id"], body, n, requests))
                results.append(
                    {
                        "clients": n,
                        "images_per_request": images,
                        "requests": len(lat),
                        "p50_ms": round(pct(lat, 50) * 1000, 2),
                        "p99_ms": round(pct(lat, 99) * 1000, 2),
                        "mean_ms": round(statistics.mean(lat) * 1000, 2),
                        "req_per_s": round(len(lat) / wall, 2),
                        "refused_429": refused,
                    }
                )
        finally:
            group.stop()
    return results


async def _load(
    url: str, job_id: str, body: list, clients: int, requests: int
) -> tuple[list[float], float, int]:
    import httpx
    from service import KEY

    lat: list[float] = []
    refused = 0
    todo = list(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=120
    ) as c:

        async def worker() -> None:
            nonlocal refused
            while todo:
                todo.pop()
                t = time.perf_counter()
                resp = await c.post(f"/v1/jobs/{job_id}/predict", files=body)
                if resp.status_code == 429:
                    refused += 1
                    continue
                if resp.status_code != 200:
                    raise RuntimeError(f"predict: {resp.status_code} {resp.text[:300]}")
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return lat, time.perf_counter() - t0, refused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", help="a job's output folder, or a succeeded job's id")
    ap.add_argument("--data", type=Path, help="the report split as class folders (default: the job's)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latencies")
    ap.add_argument("--predict", action="store_true", help="also time POST /v1/jobs/{id}/predict")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=40, help="predict requests per client count")
    ap.add_argument("--images", type=int, default=1, help="images per predict request")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from spkd.models.results.deploy_report import deploy_text

    folder = job_folder(args.job)
    metrics = json.loads((folder / "metrics.json").read_text())
    block = measure(folder, args.threads)
    print(f"job folder: {folder}")
    print(deploy_text(block))
    if (metrics.get("deploy") or {}).get("student_vs_teacher"):
        print(f"(at export time: {metrics['deploy']['student_vs_teacher']['headline']})")
    paths, labels = report_images(folder, metrics, args.data)
    agreement = int8_agreement(folder, paths, labels)
    if agreement:
        print(
            f"int8 vs fp32 on {agreement['images']} report images: accuracy "
            f"{100 * agreement['int8_accuracy']:.1f}% vs {100 * agreement['fp32_accuracy']:.1f}%, "
            f"same top-1 on {100 * agreement['agreement']:.1f}%"
        )
    result = {"deploy": block, "int8_agreement": agreement}
    if args.predict:
        result["predict"] = predict_bench(folder, paths, args.clients, args.requests, args.images)
        print(
            f"POST /v1/jobs/{{id}}/predict, {args.images} image(s) per request, spkd serve on this machine:"
        )
        print(f"{'clients':>8} {'requests':>9} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>7} {'429s':>5}")
        for row in result["predict"]:
            print(
                f"{row['clients']:>8} {row['requests']:>9} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} "
                f"{row['req_per_s']:>7.1f} {row['refused_429']:>5}"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
