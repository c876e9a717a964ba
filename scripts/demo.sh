#!/usr/bin/env bash
# The demo: set up .venv (scripts/setup.sh), then `spkd demo`, which starts Redis (unless
# $SPKD_REDIS_URL answers), the API and one worker, and distils tf_efficientnet_lite2 into
# tf_efficientnet_lite0 on scikit-learn's handwritten digits through the REST API.
#
#   bash scripts/demo.sh                               the default: a few minutes on 2 CPU cores
#   bash scripts/demo.sh --dataset ../shared/data/hymenoptera --image-size 160
#   bash scripts/demo.sh --help                        every option
#
# Ctrl-C stops everything it started.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/spkd" demo "$@"
