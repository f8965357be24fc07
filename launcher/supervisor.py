"""The supervisor `start` leaves running (`python -m launcher supervise`, log
`logs/supervisor.log`, pid file `run/supervisor.pid`): it restarts the ring when a rank
exits or when rank 0 stops making progress, and the API when it exits.

Rank 0 writes its heartbeat from its serving loop, between steps, so a heartbeat older
than STEP_TIMEOUT means a step that has not finished in that time: rank 0 itself or a
rank it waits for is stopped (SIGSTOP, a swapped-out machine), or a collective hangs.
Restarts back off (1, 2, 4, ... 30 s); past RESTART_LIMIT ring restarts in 10 minutes the
supervisor stops the ring and gives up. Every word it has (restarts, last cause, given
up and why) goes into the spool's supervision.json, where `/health`, the waiting
streams and `status` read it.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections import deque
from typing import Optional

from config import REPO_DIR
from launcher import LaunchError, processes
from launcher.hosts import HostUnreachable, Layout
from launcher.readiness import StartFailed, read_heartbeat, wait_ready, write_supervision
from launcher.run_state import (
    SUPERVISOR_FILE, RingRun, forget, load_api, load_ring, load_supervisor, save_supervisor,
)
from launcher.start import api_key, ring_ready, start_api, start_ring
from launcher.stop import stop_ring
from spool.protocol import Supervision

log = logging.getLogger(__name__)

POLL = 1.0  # seconds between looks at the ranks and the API
REMOTE_CHECK_EVERY = 10.0  # seconds between looks at ranks on other hosts (one ssh each)
WINDOW = 600.0  # RESTART_LIMIT counts the ring restarts of this many seconds
MAX_PAUSE = 30.0  # the longest pause before a restart


class Stopped(BaseException):
    """SIGTERM or SIGINT: `stop` (or a person) ends the supervisor, wherever it is."""


class Supervisor:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.settings = layout.settings
        self.record = Supervision(state="watching")
        self.ring_restarts: deque[float] = deque()  # monotonic times, within WINDOW
        self.api_restarts: deque[float] = deque()
        self.next_remote_check = 0.0
        self.next_api_check = 0.0

    def publish(self, **changes) -> None:
        self.record = self.record.model_copy(update={**changes, "time": time.time()})
        try:
            write_supervision(self.layout, self.record)
        except HostUnreachable as err:
            log.warning("could not write the supervision record on %s: %s", self.layout.rank0, err)

    def run(self) -> int:
        log.info("watching %d rank(s) and the API: STEP_TIMEOUT=%g s, RESTART_LIMIT=%d per %d min",
                 len(self.layout.machines), self.settings.step_timeout, self.settings.restart_limit, WINDOW // 60)
        self.publish()
        while True:
            cause = self.ring_problem(load_ring(self.settings.run_dir))
            if cause is not None and not self.restart_ring(cause):
                return 1
            self.check_api()
            time.sleep(POLL)

    def ring_problem(self, ring: Optional[RingRun]) -> Optional[str]:
        """Why the ring needs a restart, or None while it serves."""
        if ring is None or not ring.members():
            return "the ranks exited"
        now = time.monotonic()
        remote = now >= self.next_remote_check
        if remote:
            self.next_remote_check = now + REMOTE_CHECK_EVERY
        dead = [rank.rank for rank in ring.ranks
                if (rank.machine.is_local or remote) and rank.alive() is False]
        if dead:
            return f"rank{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} exited"
        beat = read_heartbeat(self.layout)
        if beat.time <= ring.since:
            return None  # this run's rank 0 has not written yet: wait_ready saw it ready, so it will
        if beat.state in ("failed", "stopped"):
            return f"rank 0 {beat.state}" + (f": {beat.reason}" if beat.reason else "")
        if beat.state == "ready" and beat.age is not None and beat.age > self.settings.step_timeout:
            return (f"rank 0 finished no step in {beat.age:.0f} s (STEP_TIMEOUT={self.settings.step_timeout:g}): "
                    "a rank is stopped or a collective hangs")
        return None

    def restart_ring(self, cause: str) -> bool:
        """Stop what is left of the ring and start it again, until it serves or
        RESTART_LIMIT is reached; False when the supervisor gives up."""
        while True:
            recent = within_window(self.ring_restarts)
            if recent >= self.settings.restart_limit:
                reason = (f"{recent} ring restarts in the last {WINDOW // 60:.0f} minutes reached "
                          f"RESTART_LIMIT={self.settings.restart_limit}; last cause: {cause}")
                log.error("giving up: %s; the ring stays stopped until ./launch.sh start", reason)
                stop_ring(self.layout, patient=False)
                self.publish(state="gave_up", reason=reason, last_cause=cause)
                return False
            self.ring_restarts.append(time.monotonic())
            pause = min(MAX_PAUSE, 2.0 ** recent)
            log.warning("ring restart %d: %s; starting again in %.0f s", self.record.restarts + 1, cause, pause)
            self.publish(state="restarting", restarts=self.record.restarts + 1, last_cause=cause)
            stop_ring(self.layout, patient=False)
            time.sleep(pause)
            self.check_api(now=True)
            api = load_api(self.settings.run_dir)
            try:
                ring = start_ring(self.layout)
                if api is None:
                    raise StartFailed("the API is not running")
                ring_ready(self.layout, ring, wait_ready(self.layout, ring, api))
            except StartFailed as failure:
                cause = f"the restart failed: {failure}"
                continue
            self.publish(state="watching")
            return True

    def check_api(self, now: bool = False) -> None:
        """Start the API again when it has exited (its restarts back off as the ring's)."""
        if not now and time.monotonic() < self.next_api_check:
            return
        api = load_api(self.settings.run_dir)
        if api is not None and api.alive() is not False:
            return
        recent = within_window(self.api_restarts)
        self.api_restarts.append(time.monotonic())
        self.next_api_check = time.monotonic() + min(MAX_PAUSE, 2.0 ** recent)
        log.warning("the API (%s) exited: starting it again", api)
        try:
            start_api(self.layout, api_key(self.layout))
        except StartFailed as failure:
            log.error("could not start the API: %s", failure)
            return
        self.publish(api_restarts=self.record.api_restarts + 1)


def within_window(times: deque[float]) -> int:
    """Drop the times older than WINDOW; how many are left."""
    while times and time.monotonic() - times[0] > WINDOW:
        times.popleft()
    return len(times)


def supervise(layout: Layout) -> int:
    """The supervisor's life, until `stop` sends SIGTERM or it gives up."""
    logging.basicConfig(format="%(asctime)s supervisor %(levelname)s: %(message)s", level=logging.INFO,
                        stream=sys.stderr, force=True)

    def stopped(signum, frame):
        raise Stopped()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)
    try:
        return Supervisor(layout).run()
    except Stopped:
        log.info("stopped")
        return 0


def start_supervisor(layout: Layout) -> None:
    """Spawned detached, like the ranks; it reads the same settings (environment, then
    the settings file) as this launcher."""
    settings = layout.settings
    ref = processes.spawn([sys.executable, "-m", "launcher", "supervise"], settings.log_dir / "supervisor.log",
                          cwd=str(REPO_DIR))
    save_supervisor(settings.run_dir, ref)
    log.info("supervisor started (pid %d), log %s", ref.pid, settings.log_dir / "supervisor.log")


def stop_supervisor(layout: Layout) -> None:
    """First of all in stop and restart, so it does not restart what they stop."""
    run_dir = layout.settings.run_dir
    ref = load_supervisor(run_dir)
    if ref is not None and processes.running(ref) is not None:
        if not processes.end(processes.one(ref), "the supervisor"):
            raise LaunchError(f"the supervisor (pid {ref.pid}) is still alive: kill it by hand")
        log.info("supervisor stopped")
    forget(run_dir, SUPERVISOR_FILE)
    try:
        write_supervision(layout, None)
    except HostUnreachable:
        pass  # what it said stays until the next start or stop reaches rank 0's host
