"""What bench/api_bench.py and bench/load.py share: a sandbox (temp folder + Redis key prefix,
removed afterwards), the service's environment, `spkd serve` (+ a worker) started with cli/procs.py,
a tiny dataset and the JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spkd.cli import procs  # noqa: E402

SPKD = str(Path(sys.executable).parent / "spkd")
KEY = "bench-key"


@contextlib.contextmanager
def sandbox(name: str, redis_url: str) -> Iterator[tuple[Path, str]]:
    """A temp folder and a unique Redis key prefix (`spkd<name>-<tag>`); on the way out, whatever
    happened, the folder and every key under the prefix are removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f"spkd-{name}-"))
    prefix = f"spkd{name}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp, prefix
    finally:
        import redis

        from spkd.core import store

        store.delete_prefix(redis.Redis.from_url(redis_url), prefix)
        shutil.rmtree(tmp, ignore_errors=True)


def service_env(redis_url: str, prefix: str, queue: str, tmp: Path) -> dict[str, str]:
    """The API's and worker's environment: own key prefix and queue, data under `tmp`, no hub."""
    return dict(
        os.environ,
        SPKD_REDIS_URL=redis_url,
        SPKD_REDIS_PREFIX=prefix,
        SPKD_QUEUE=queue,
        SPKD_API_KEYS=KEY,
        SPKD_DATA_ROOT=str(tmp / "data"),
        SPKD_ARTIFACT_ROOT=str(tmp / "artifacts"),
        SPKD_HUB_WEIGHTS="false",
        OMP_NUM_THREADS="1",
    )


def start_service(
    group: procs.Group, port: int, env: dict[str, str], worker: bool, timeout_s: float, api_log: str = "api"
) -> str:
    """`spkd serve` on loopback, plus one `spkd worker` when asked; returns the URL once it is ready
    (/readyz needs a worker, /healthz does not). A process that dies fails it with its log tail."""
    url = f"http://127.0.0.1:{port}"
    serve = [SPKD, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    started = [group.start(api_log, serve, env)]
    if worker:
        started.append(group.start("worker", [SPKD, "worker", "--loglevel", "WARNING"], env))
    procs.wait_http(url + ("/readyz" if worker else "/healthz"), timeout_s, started)
    return url


def colour_folder(dest: Path, per_class: int) -> None:
    """Two classes of flat-colour 40x40 JPEGs: enough for a job to start and train tiny models."""
    for cls, color in (("a", "red"), ("b", "blue")):
        (dest / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), color).save(dest / cls / f"{i}.jpg")


def emit(result: dict, path: Path | None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        path.write_text(json.dumps(result, indent=2))


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `xs`."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
