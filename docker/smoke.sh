#!/usr/bin/env bash
# Smoke test of the images and the compose stack on this machine (not in CI: minutes, ~7 GB).
#
#   bash docker/smoke.sh
#
# 1. starts a local Docker engine and base image (../shared/tools/local-docker.sh base, or
#    $LOCAL_DOCKER), builds spkd-api, spkd-worker (FROM that base) and a Redis image;
# 2. brings up a CPU-only, host-network variant of docker-compose.yml (docker/local_compose.py)
#    on ports 6391 (Redis) and 8391 (API);
# 3. uploads a small dataset and runs a small job over REST (tiny timm models), downloads the
#    student checkpoint and checks its sha256;
# 4. restarts the redis service and checks the job is still there (AOF on a volume);
# 5. tears everything down (also on failure or Ctrl-C) and removes the images it built, unless
#    SMOKE_KEEP_IMAGES=1.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
local_docker=${LOCAL_DOCKER:-$root/../shared/tools/local-docker.sh}
base=${BASE_IMAGE:-spkd-base:bookworm}
tag=smoke
project=spkd-smoke
redis_port=${SMOKE_REDIS_PORT:-6391}
api_port=${SMOKE_API_PORT:-8391}
api="http://127.0.0.1:$api_port"
py="$root/.venv/bin/python"
[ -x "$py" ] || { echo "run scripts/setup.sh first (the smoke test uses .venv for YAML and the dataset)"; exit 1; }
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-900}  # creating a container from a 6 GB image on vfs takes minutes

t_start=$(date +%s)
step() { printf '\033[1m[smoke %4ss]\033[0m %s\n' "$(( $(date +%s) - t_start ))" "$*" >&2; }
work=$(mktemp -d)
dc() { $compose -p "$project" -f "$work/compose.yml" "$@"; }
cleanup() {
  rc=$?
  if [ -f "$work/compose.yml" ]; then
    [ "$rc" = 0 ] || { step "FAILED (rc=$rc); last logs:"; dc logs --tail 40 2>&1 | tail -80 || true; }
    step "tearing down"
    dc down -v --remove-orphans >/dev/null 2>&1 || true
    # A container whose creation outlived the client's timeout appears after `down`.
    docker ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r docker rm -f >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  if [ "${SMOKE_KEEP_IMAGES:-0}" != 1 ]; then
    # The images are large (on vfs every layer is a full copy): give the disk back.
    docker rmi "spkd-worker:$tag" "spkd-api:$tag" "spkd-redis:$tag" >/dev/null 2>&1 || true
    docker image prune -f >/dev/null 2>&1 || true  # earlier builds' chains, now untagged
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "docker engine and base image"
bash "$local_docker" base >&2
# Looked up only now: on a new machine the line above is what installs docker-compose (v1).
compose=$(command -v docker-compose || true)
[ -n "$compose" ] || compose="docker compose"
# An imported rootfs keeps the mode of the folder it was tarred from (mktemp -d: 0700), and then
# the images' non-root user cannot reach any file ("permission denied" on the entrypoint). A
# RUN chmod in a Dockerfile does not persist a change to /, so re-import the base with / at 0755.
if [ "$(docker run --rm --network host "$base" /usr/bin/stat -c %a /)" != 755 ]; then
  step "base image / is not 0755: re-importing $base with / world-readable"
  fix=$(mktemp -d)
  cid=$(docker create --network host "$base" /bin/true)
  docker export "$cid" | tar -C "$fix" -xf -
  docker rm "$cid" >/dev/null
  chmod 0755 "$fix"
  tar -C "$fix" -c . | docker import - "$base" >/dev/null
  rm -rf "$fix"
fi

# On vfs every layer is a full copy: a worker build takes ~25 GB while it runs, and each rebuild of
# the same tag leaves the previous chain behind as dangling images. Stop early rather than fill the
# disk halfway through a build (this machine's disk is shared: a full disk stops everything on it).
docker_root=$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)
free_gb=$(df --output=avail -BG "$docker_root" | tail -1 | tr -dc 0-9)
need_gb=${SMOKE_MIN_FREE_GB:-30}
if [ "$free_gb" -lt "$need_gb" ]; then
  step "only ${free_gb} GB free under $docker_root (need ${need_gb}); free some, e.g.: docker image prune -f"
  exit 1
fi

key=smoke-$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
printf 'SPKD_API_KEYS=%s\n' "$key" >"$work/spkd.env"
auth=(-H "Authorization: Bearer $key")

build() {  # name dockerfile
  local t0=$(date +%s)
  docker build -q --network host --build-arg BASE_IMAGE="$base" -f "$2" -t "$1" . >/dev/null
  step "built $1 in $(( $(date +%s) - t0 ))s ($(docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1/1e9}'))"
}
step "building images on $base"
build "spkd-api:$tag" docker/Dockerfile.api
build "spkd-worker:$tag" docker/Dockerfile.worker
# Redis from Debian on the same base (image registries are unreachable here).
printf 'ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*\nWORKDIR /data\n' \
  >"$work/Dockerfile.redis"
t0=$(date +%s)
docker build -q --network host --build-arg BASE_IMAGE="$base" -f "$work/Dockerfile.redis" -t "spkd-redis:$tag" "$work" >/dev/null
step "built spkd-redis:$tag in $(( $(date +%s) - t0 ))s"

"$py" docker/local_compose.py --env-file "$work/spkd.env" --tag "$tag" --redis-image "spkd-redis:$tag" \
  --redis-port "$redis_port" --api-port "$api_port" >"$work/compose.yml"

step "compose up (host network, CPU only: redis :$redis_port, api :$api_port, worker)"
t0=$(date +%s)
dc up -d >&2
wait_ready() {
  for _ in $(seq 240); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$api/readyz")" = 200 ] && return 0
    sleep 1
  done
  return 1
}
wait_ready || { step "API not ready (Redis + worker) after 240s"; exit 1; }
step "stack ready (/readyz 200) in $(( $(date +%s) - t0 ))s"

step "uploading a small dataset (3 digit classes from scikit-learn)"
"$py" - "$work" <<'PY'
import shutil, sys
from pathlib import Path
from spkd.cli.files import zip_folder
from spkd.cli.demo import write_digits_imagefolder
work = Path(sys.argv[1])
# 40 scans per digit (32 train, 8 val) keep the job short.
write_digits_imagefolder(work / "digits", size=32, per_class=40)
for split in ("train", "val"):
    for cls in (work / "digits" / split).iterdir():
        if cls.name not in ("0", "1", "2"):
            shutil.rmtree(cls)
zip_folder(work / "digits", work / "digits.zip")
PY
ds=$(curl -sf "${auth[@]}" -F "file=@$work/digits.zip" -F name=smoke-digits "$api/v1/datasets")
ds_id=$("$py" -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$ds")
step "dataset $ds_id"

spec=$(printf '{"teacher": {"model": "test_efficientnet", "weights": "none", "finetune": {"epochs": 1}},
 "student": {"model": "test_resnet", "weights": "none"}, "dataset": {"id": "%s"},
 "train": {"epochs": 1, "batch_size": 16, "image_size": 32}, "baseline": true}' "$ds_id")
# -f would hide the API's error body; show it so a refused job says why.
job=$(curl -s "${auth[@]}" -H 'Content-Type: application/json' -H "Idempotency-Key: smoke-$key" -d "$spec" "$api/v1/jobs")
"$py" -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if "id" in d else f"job refused: {d}")' <<<"$job"
job_id=$("$py" -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$job")
step "job $job_id submitted"
t0=$(date +%s)
status=""
for _ in $(seq 600); do
  status=$(curl -sf "${auth[@]}" "$api/v1/jobs/$job_id" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["status"])' || true)
  case "$status" in succeeded|failed|cancelled) break ;; esac
  sleep 1
done
step "job $job_id: $status after $(( $(date +%s) - t0 ))s"
if [ "$status" != succeeded ]; then
  curl -s "${auth[@]}" "$api/v1/jobs/$job_id" >&2; echo >&2; exit 1
fi

listing=$(curl -sf "${auth[@]}" "$api/v1/jobs/$job_id/artifacts")
want=$("$py" -c 'import json,sys; print(next(a["sha256"] for a in json.load(sys.stdin)["data"] if a["name"] == "student/model.safetensors"))' <<<"$listing")
curl -sf "${auth[@]}" -o "$work/student.safetensors" "$api/v1/jobs/$job_id/artifacts/student/model.safetensors"
got=$(sha256sum "$work/student.safetensors" | cut -d' ' -f1)
[ "$got" = "$want" ] || { step "checksum mismatch: $got != $want"; exit 1; }
step "downloaded student/model.safetensors ($(stat -c %s "$work/student.safetensors") bytes, sha256 ok)"
"$py" - "$work/student.safetensors" <<'PY'
import sys
from safetensors.torch import load_file
sd = load_file(sys.argv[1])
print(f"[smoke] checkpoint has {len(sd)} tensors", file=sys.stderr)
PY

step "restarting the redis service"
dc restart redis >&2
after=""
for _ in $(seq 60); do
  after=$(curl -s "${auth[@]}" "$api/v1/jobs/$job_id" | "$py" -c 'import json,sys; print(json.load(sys.stdin).get("status",""))' 2>/dev/null || true)
  [ -n "$after" ] && break
  sleep 1
done
[ "$after" = succeeded ] || { step "after the Redis restart the job reads '$after', expected succeeded"; exit 1; }
step "after the Redis restart job $job_id is still '$after' (AOF)"
wait_ready || { step "stack not ready again after the Redis restart"; exit 1; }
step "stack ready again after the Redis restart"
step "PASS in $(( $(date +%s) - t_start ))s"
