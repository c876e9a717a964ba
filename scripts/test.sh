#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: lint, format check, pytest.
#
#   bash scripts/test.sh [pytest args...]     e.g. bash scripts/test.sh tests/ship -x
#
# As root on Debian/Ubuntu it installs what the tests need from apt when missing: redis-server
# (integration tests talk to a real Redis) and chromium (the dashboard's browser test). It uses
# the Redis at $SPKD_REDIS_URL (default redis://127.0.0.1:6379/0) and starts one there, for the
# length of the run, when none answers. Slow tests run too; tests marked `docker` (they need a
# Docker engine, see docker/smoke.sh) do not.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }

bash scripts/setup.sh

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian packages: ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    log "missing ${need[*]} (not root, not installing): tests that need them will fail or skip"
  fi
fi

# A Redis for the integration tests: the configured one, or one we start and stop ourselves.
export SPKD_REDIS_URL=${SPKD_REDIS_URL:-redis://127.0.0.1:6379/0}
redis_pid=""
redis_dir=""
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if [ -n "$redis_dir" ]; then rm -rf "$redis_dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
redis_up() { .venv/bin/python -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping()" "$SPKD_REDIS_URL" 2>/dev/null; }
if ! redis_up; then
  port=$(.venv/bin/python -c "from urllib.parse import urlsplit; import sys; print(urlsplit(sys.argv[1]).port or 6379)" "$SPKD_REDIS_URL")
  redis_dir=$(mktemp -d)
  log "starting redis-server on 127.0.0.1:$port for this run"
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$redis_dir" \
    --logfile "$redis_dir/redis.log" &
  redis_pid=$!
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { log "Redis did not come up: $(tail -3 "$redis_dir/redis.log")"; exit 1; }
fi

log "ruff check"
.venv/bin/ruff check .
log "ruff format --check"
.venv/bin/ruff format --check .

log "pytest (slow tests included, docker tests excluded)"
rc=0
.venv/bin/python -m pytest -m "not docker" --durations=20 "$@" || rc=$?
if [ "$rc" = 5 ]; then
  # pytest's "no tests collected": only possible with a filter that matched nothing.
  log "pytest collected no tests"
  rc=0
fi
exit "$rc"
