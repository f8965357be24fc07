"""`start` and `restart`: check what would make a start fail half-way, start the ranks
and the API (or keep a running API whose settings did not change), and wait until they
serve; a start that fails shows the logs that tell why and stops what it started."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
import signal
from contextlib import contextmanager
from typing import Iterator, Optional

from config import REPO_DIR
from launcher import LaunchError, processes
from launcher.hosts import HostUnreachable, Layout
from launcher.processes import ProcessRef
from launcher.readiness import (
    Heartbeat, StartFailed, api_url, read_heartbeat, show_failure_logs, wait_ready, write_supervision,
)
from launcher.ring_command import ring_command
from launcher.run_state import (
    ApiRun,
    RingRun,
    ranks_from_heartbeat,
    running_api,
    running_ring,
    save_api,
    save_ring,
)
from launcher.stop import stop_api, stop_ring

log = logging.getLogger(__name__)


def start(layout: Layout) -> None:
    ring = running_ring(layout.settings.run_dir)
    if ring is not None:
        raise LaunchError(f"the ring is already running (launcher pid {ring.launcher.pid}): "
                          "use ./launch.sh restart, or stop")
    preflight(layout)
    start_all(layout)


def restart(layout: Layout) -> None:
    preflight(layout)
    if not stop_ring(layout):
        raise LaunchError("the running ring did not stop, so no new one starts")
    start_all(layout)


def preflight(layout: Layout) -> None:
    """Everything that would make start fail half-way, checked before anything starts."""
    settings, rank0 = layout.settings, layout.rank0
    if settings.backend == "mpi" and shutil.which("mpirun") is None:
        raise LaunchError("BACKEND=mpi needs mpirun: run ./launch.sh setup (installs Open MPI), or set BACKEND=ring")
    if settings.backend == "jaccl" and settings.hostfile is None:
        raise LaunchError("BACKEND=jaccl needs HOSTFILE with the RDMA devices: make one with mlx.distributed_config")
    for machine in layout.remote_machines():
        machine.check(machine.python, f"put the repository at REMOTE_DIR={settings.remote_dir} there and run "
                                      "./launch.sh setup --all-hosts")
    host, port = settings.api_host, settings.api_port
    if not rank0.is_local and (host.startswith("127.") or host in ("localhost", "::1")):
        raise LaunchError(f"API_HOST={host}: the API runs on rank 0's host {rank0} and would be reachable only "
                          "there; set API_HOST=0.0.0.0 (or that host's address)")
    if running_api(settings.run_dir) is None and not rank0.task("port_free", host, port):
        raise LaunchError(f"port {port} on {host} ({rank0}) is in use: stop what listens there (lsof -i :{port}) "
                          "or set API_PORT")
    # mlx.launch gives rank r the port RING_PORT + r; our own running ring holds them.
    size = len(layout.machines)
    if settings.backend != "mpi" and settings.hostfile is None and size > 1 and not running_ring(settings.run_dir):
        for rank, machine in enumerate(layout.machines):
            address = layout.hosts[rank].address if layout.hosts else "127.0.0.1"
            if not machine.task("port_free", address, settings.ring_port + rank):
                raise LaunchError(f"port {settings.ring_port + rank} on {machine} (ring backend, rank {rank}) is in "
                                  f"use: set RING_PORT to a free range of {size} ports")


def start_all(layout: Layout) -> None:
    settings = layout.settings
    layout.copy_env()
    write_supervision(layout, None)  # a last run's supervisor's word is not this run's
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    ring = start_ring(layout)
    api: Optional[ApiRun] = None
    started_api = False
    try:
        with interrupts_fail_the_start():
            key = api_key(layout)
            api = kept_api(layout, key)
            if api is None:
                api, started_api = start_api(layout, key), True
            beat = wait_ready(layout, ring, api)
    except StartFailed as failure:
        log.info("start failed: %s", failure)
        show_failure_logs(layout, failure, api)
        log.info("stopping what this start started")
        stop_ring(layout)
        if started_api:
            stop_api(layout)
        raise SystemExit(1) from None
    ring_ready(layout, ring, beat)
    print(f"{api_url(layout)}/v1", flush=True)


def ring_ready(layout: Layout, ring: RingRun, beat: Heartbeat) -> None:
    """Record the ranks the ready heartbeat names, for stop, status and the supervisor."""
    settings = layout.settings
    ring.ranks = ranks_from_heartbeat(beat.ranks, layout.machines)
    save_ring(settings.run_dir, ring)
    log.info("ready: %d rank(s), BACKEND=%s, %s parallel, model %s", len(layout.machines), settings.backend,
             beat.parallel.get("mode", "pipeline"), beat.model)


@contextmanager
def interrupts_fail_the_start() -> Iterator[None]:
    """Ctrl-C or SIGTERM while waiting stops what this start started."""
    def interrupted(signum, frame):
        raise StartFailed("interrupted")

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def rotate_rank_logs(layout: Layout) -> None:
    """Each run's logs start empty; the previous run's stay beside them as *.log.1 (the
    ranks write their own logs, on their hosts)."""
    for rank, machine in enumerate(layout.machines):
        file = f"{machine.path(layout.settings.log_dir)}/rank{rank}.log"
        machine.shell(f"mv -f {shlex.quote(file)} {shlex.quote(file + '.1')} 2>/dev/null || true")


def start_ring(layout: Layout) -> RingRun:
    """Spawn the launcher of the ranks; its pid file keeps the heartbeat time before it,
    to tell this run's heartbeats."""
    settings = layout.settings
    since = read_heartbeat(layout).time
    rotate_rank_logs(layout)
    command = ring_command(layout)
    log.info("starting %d rank(s), BACKEND=%s: %s", len(layout.machines), settings.backend, " ".join(command))
    ring = RingRun(processes.spawn(command, settings.log_dir / "launcher.log", cwd=str(REPO_DIR)), since)
    save_ring(settings.run_dir, ring)
    return ring


def api_key(layout: Layout) -> str:
    """A digest of what the API runs with: the settings, those given in the environment,
    and its host."""
    text = json.dumps([layout.settings.model_dump(mode="json"), layout.given, str(layout.rank0)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def kept_api(layout: Layout, key: str) -> Optional[ApiRun]:
    """The running API when its settings (and host) are unchanged: then clients waiting
    on queued requests keep their connections. One with other settings is stopped."""
    api = running_api(layout.settings.run_dir)
    if api is None:
        return None
    if api.key == key:
        log.info("API already running (%s): kept", api)
        return api
    log.info("settings changed: restarting the API")
    try:
        stop_api(layout)
    except LaunchError as err:
        raise StartFailed(str(err)) from None
    return None


def start_api(layout: Layout, key: str) -> ApiRun:
    """The API on rank 0's host, next to its spool."""
    machine, settings = layout.rank0, layout.settings
    log_file = f"{machine.path(settings.log_dir)}/api.log"
    command = [machine.python, machine.path(REPO_DIR / "api.py")]
    try:
        pid, created = machine.task("spawn", command, log_file, machine.path(REPO_DIR), layout.given)
    except HostUnreachable as err:
        raise StartFailed(f"could not start the API on {machine} ({err})") from None
    api = ApiRun(machine, ProcessRef(pid, created), key)
    save_api(settings.run_dir, api)
    log.info("API starting (%s), log %s", api, log_file)
    return api
