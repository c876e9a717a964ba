#!/usr/bin/env bash
# Set up spkd in this checkout: a virtualenv .venv with the pinned dependencies and `spkd` in it.
#
#   bash scripts/setup.sh            idempotent; a second run returns in about a second
#
# Needs Python 3.11+ (python3, or $PYTHON). On Debian/Ubuntu as root it installs python3-venv when
# the venv module is missing. Only package registries are used: pip for Python packages, apt for
# Debian ones. The installed versions are pinned by requirements/constraints.txt (a `pip freeze`
# of a full install), so every fresh clone gets the same environment.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
constraints="$root/requirements/constraints.txt"
stamp="$venv/.spkd-setup"
# torch and torchvision are installed on their own, by these exact pins, before the rest: the
# other packages then resolve against them instead of pulling a different build.
torch_pins=(torch==2.14.1 torchvision==0.29.1)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

pick_python() {
  local py
  for py in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  log "spkd needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)"; exit 1
}

apt_install() {
  # Debian packages, only when we may (root) and they are missing; never an error by itself.
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  log "installing Debian packages: $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

# What the environment is built from: a change to any of these rebuilds it.
want=$(cat pyproject.toml setup.py "$constraints" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/spkd" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log ".venv is up to date"
  exit 0
fi

py=$(pick_python)
if [ ! -x "$venv/bin/python" ]; then
  if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
    ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install "python$ver-venv" || apt_install python3-venv ||
      { log "the Python venv module is missing: apt-get install python3-venv"; exit 1; }
  fi
  log "creating .venv with $("$py" --version)"
  "$py" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check)
log "installing ${torch_pins[*]} (large on a machine without them cached)"
"${pip[@]}" install -q -c "$constraints" "${torch_pins[@]}"
log "installing spkd (editable) with the worker and dev extras"
"${pip[@]}" install -q -c "$constraints" -e ".[worker,dev]"
echo "$want" >"$stamp"
log "ready: $venv/bin/spkd"
