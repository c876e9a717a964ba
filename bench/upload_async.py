"""HTTP time of a large dataset upload, synchronous vs background validation.

Builds a zip of `--mb` MiB (the hymenoptera photos repeated under more classes, stored), starts
`spkd serve` twice: once with SPKD_UPLOAD_SYNC_MAX_BYTES above the zip (the request extracts and
scans: 201) and once below it (202 at once, scanned in the background), and prints the time until
the HTTP answer and until `ready`.

    python bench/upload_async.py --mb 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.service import KEY, SPKD, sandbox  # noqa: E402
from spkd.cli import procs  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "hymenoptera" / "train"


def build_zip(dest: Path, mib: int) -> Path:
    """Stored (not deflated) photos, class folders c000.. until the zip reaches `mib` MiB."""
    files = sorted(p for p in PHOTOS.rglob("*.jpg"))
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        n = 0
        while dest.stat().st_size < mib * 1024**2:
            p = files[n % len(files)]
            zf.write(p, f"big/c{n // 200:03d}/{n}.jpg")
            n += 1
    return dest


def run(zip_path: Path, tmp: Path, prefix: str, redis_url: str, threshold: int) -> tuple[int, float, float]:
    """(HTTP status, seconds until the answer, seconds until ready)."""
    port = procs.free_port()
    env = dict(
        os.environ,
        SPKD_REDIS_URL=redis_url,
        SPKD_REDIS_PREFIX=prefix,
        SPKD_API_KEYS=KEY,
        SPKD_DATA_ROOT=str(tmp / f"data-{threshold}"),
        SPKD_ARTIFACT_ROOT=str(tmp / "artifacts"),
        SPKD_UPLOAD_SYNC_MAX_BYTES=str(threshold),
        OMP_NUM_THREADS="1",
    )
    (tmp / f"data-{threshold}").mkdir(parents=True, exist_ok=True)
    args = [SPKD, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    api = procs.spawn("api", args, tmp / f"api-{threshold}.log", env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        procs.wait_http(f"{url}/healthz", 60, [api])
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=900) as c:
            t0 = time.perf_counter()
            with zip_path.open("rb") as f:
                resp = c.post("/v1/datasets", files={"file": ("big.zip", f, "application/zip")})
            answered = time.perf_counter() - t0
            ds = resp.json()
            while ds.get("status") == "validating":
                time.sleep(0.5)
                ds = c.get(f"/v1/datasets/{ds['id']}").json()
            ready = time.perf_counter() - t0
            assert ds.get("status") == "ready", ds
        return resp.status_code, answered, ready
    finally:
        api.stop(grace_s=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    with sandbox("upload", a.redis_url) as (tmp, prefix):
        zip_path = build_zip(tmp / "big.zip", a.mb)
        size = zip_path.stat().st_size
        print(f"zip: {size / 1024**2:.0f} MiB")
        print("mode   status  HTTP answer (s)  ready (s)")
        for mode, threshold in (("sync", size + 1), ("async", 64 * 1024**2)):
            status, answered, ready = run(zip_path, tmp, prefix, a.redis_url, threshold)
            print(f"{mode:6} {status:6}  {answered:15.2f}  {ready:9.2f}")


if __name__ == "__main__":
    main()
