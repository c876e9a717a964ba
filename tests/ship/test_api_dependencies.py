"""The API image installs only the package's base dependencies (pyproject `dependencies`, no extras).
Everything the API imports while serving must therefore come from those and what they require:
the Docker smoke test found kombu's Redis transport importing `packaging` on the first enqueue,
a package only the dev tools had installed here, and every POST /v1/jobs in the image failed.

The API runs in a child process through every route family (upload, create + enqueue on the real
Redis broker, list, get, events, cancel, artifacts, models, ops endpoints, dashboard, predict with a
finished job's student.onnx); the
distributions of the modules it imported must all lie in the closure of the base requirements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from tests.helpers import (
    KEY_A,
    ROOT,
    finished_job,
    onnx_classifier,
    settings_env,
    small_imagefolder,
    tiny_spec,
    zip_dir,
)

# The child: the real app under uvicorn in a thread, driven over loopback with the standard
# library only (a TestClient would import test-only packages), then its sys.modules.
CHILD = r"""
import json, socket, sys, threading, time, urllib.request
import uvicorn
from spkd.app.main import create_app
from spkd.core.settings import Settings

zip_path, key, spec, finished, image = sys.argv[1:6]
spec = json.loads(spec)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
server = uvicorn.Server(uvicorn.Config(create_app(Settings()), log_level="warning"))
threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
base = "http://127.0.0.1:%d" % sock.getsockname()[1]

def call(method, path, body=None, ctype="application/json", ok=(200, 201)):
    req = urllib.request.Request(base + path, data=body, method=method)
    req.add_header("Authorization", "Bearer " + key)
    req.add_header("Content-Type", ctype)
    req.add_header("Idempotency-Key", "deps")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, data = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    assert status in ok, (path, status, data[:300])
    return json.loads(data) if data[:1] in (b"{", b"[") else data

while not server.started:
    time.sleep(0.05)
with open(zip_path, "rb") as fh:
    ds = call("POST", "/v1/datasets", fh.read(), "application/zip")
spec["dataset"] = {"id": ds["id"]}
job = call("POST", "/v1/jobs", json.dumps(spec).encode())  # enqueued on the real broker
for path in ("/v1/jobs", "/v1/jobs/" + job["id"], "/v1/jobs/%s/events" % job["id"], "/v1/datasets",
             "/v1/models", "/healthz", "/metrics", "/", "/openapi.json"):
    call("GET", path)
call("POST", "/v1/jobs/%s/cancel" % job["id"])
call("GET", "/v1/jobs/%s/events?stream=true" % job["id"])  # SSE; the job is final, so it ends
call("GET", "/v1/jobs/%s/artifacts" % job["id"])
call("GET", "/readyz", ok=(200, 503))  # 503 without a worker; the code path is what counts
with open(image, "rb") as fh:  # predict with a finished job's student.onnx (onnxruntime, NumPy)
    part = fh.read()
body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
        b"Content-Type: image/png\r\n\r\n" + part + b"\r\n--b0undary--\r\n")
call("POST", "/v1/jobs/%s/predict" % finished, body, "multipart/form-data; boundary=b0undary")
server.should_exit = True
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""

# Imported when present, with a fallback when not: not dependencies. Each entry says where.
OPTIONAL = {
    "greenlet": "celery/utils/threads.py: try greenlet.getcurrent, else _thread.get_ident",
    "xxhash": "redis/commands/core.py: try import xxhash (present here through the worker's `datasets`)",
    # redis/utils.py: try import cryptography (present here through the dev extra's mlflow); cffi
    # is what cryptography itself imports.
    "cryptography": "redis/utils.py: try import cryptography, else CRYPTOGRAPHY_AVAILABLE = False",
    "cffi": "imported by cryptography only (see above)",
}

# Imported at interpreter start-up by this environment's .pth files, not by the API.
STARTUP = r"""import json, sys; print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))"""


def base_requirement_closure() -> set[str]:
    """Canonical names of spkd's distribution and everything its base requirements pull in,
    following extras named by the requirements themselves (e.g. celery[redis] -> kombu[redis]).
    spkd's own requirements are read from this checkout's pyproject.toml (the installed metadata
    may be an older checkout's); the rest from the installed distributions' metadata."""
    env = default_environment()
    seen: dict[str, set[str]] = {}
    todo: list[tuple[str, set[str]]] = [("spkd", set())]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    while todo:
        name, extras = todo.pop()
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        for line in declared if name == "spkd" else metadata.requires(name) or []:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({**env, "extra": e}) for e in (seen[name] or {""})
            )
            if wanted:
                todo.append((canonicalize_name(req.name), set(req.extras)))
    return set(seen)


def test_base_requirement_closure_is_computed_from_metadata() -> None:
    closure = base_requirement_closure()
    # Direct, transitive and extra-only requirements are in; worker and dev extras are not.
    assert {"fastapi", "starlette", "celery", "kombu", "packaging", "redis"} <= closure
    assert {"onnxruntime", "numpy"} <= closure  # predict runs student.onnx in the API
    assert not {"torch", "timm", "pytest", "ruff"} & closure


def test_api_imports_only_its_declared_dependencies(tmp_path: Path, settings, r, keys) -> None:
    archive = zip_dir(small_imagefolder(tmp_path / "ds", per_class=2), tmp_path / "ds.zip")
    finished = finished_job(r, keys, settings, onnx_classifier(tmp_path / "model"))
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "red").save(image)
    env = dict(os.environ, **settings_env(settings))
    args = [str(archive), KEY_A, json.dumps(tiny_spec({})), finished["id"], str(image)]
    res = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    startup = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, check=True)
    imported = set(json.loads(res.stdout.splitlines()[-1])) - set(json.loads(startup.stdout))
    assert "torch" not in imported  # docs/architecture.md: the API never imports torch

    owners = metadata.packages_distributions()
    closure = base_requirement_closure()
    ours = {"app", "cli", "core", "models", "workers", *OPTIONAL}
    undeclared = {
        module: dists
        for module in sorted(imported)
        if module not in ours
        and (dists := owners.get(module))
        and not {canonicalize_name(d) for d in dists} & closure
    }
    assert undeclared == {}, f"the API imports modules of undeclared distributions: {undeclared}"
