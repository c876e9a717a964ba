#!/usr/bin/env bash
# Entry point of the spkd images:
#   api                 the REST API (uvicorn) on $SPKD_HOST:$SPKD_PORT
#   worker              a Celery worker (one per GPU)
#   flower              the Flower dashboard of the Celery queue (image built with SPKD_EXTRAS=flower),
#                       behind the basic-auth login SPKD_FLOWER_BASIC_AUTH=user:password (required)
#   healthcheck api     exit 0 when GET /healthz answers
#   healthcheck worker  exit 0 when this container's worker heartbeat is fresh in Redis
#   anything else       passed to `spkd`
set -euo pipefail

healthcheck() {
  case "${1:-}" in
    api)
      exec python3 -c '
import os, sys, urllib.request
url = f"http://127.0.0.1:{os.environ.get(\"SPKD_PORT\", \"8000\")}/healthz"
sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)'
      ;;
    worker)
      exec python3 -c '
import socket, sys
from spkd.core import store
from spkd.core.settings import get_settings
s = get_settings()
live = store.live_workers(store.connect(s.redis_url), store.Keys(s.redis_prefix), s.heartbeat_ttl_s)
sys.exit(0 if any(w.get("host") == socket.gethostname() for w in live) else 1)'
      ;;
    *) echo "usage: healthcheck api|worker" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  api)
    shift
    exec spkd serve --host "${SPKD_HOST:-0.0.0.0}" --port "${SPKD_PORT:-8000}" "$@"
    ;;
  worker)
    shift
    exec spkd worker "$@"
    ;;
  flower)
    shift
    # Flower can revoke and inspect every job: never publish it without a login.
    if [ -z "${SPKD_FLOWER_BASIC_AUTH:-}" ] || [[ "$SPKD_FLOWER_BASIC_AUTH" != *:* ]]; then
      echo "spkd-entrypoint: set SPKD_FLOWER_BASIC_AUTH=user:password (in spkd.env) to run Flower" >&2
      exit 2
    fi
    exec celery -A spkd.workers.celery_app flower --port="${SPKD_FLOWER_PORT:-5555}" \
      --basic-auth="$SPKD_FLOWER_BASIC_AUTH" "$@"
    ;;
  healthcheck)
    shift
    healthcheck "$@"
    ;;
  *)
    exec spkd "$@"
    ;;
esac
