"""The processes the launcher starts: spawned detached, known by pid and create time,
and ended in one place (SIGTERM, a grace period, SIGKILL).

A pid alone is not ours for long: once the process exits the system may give the pid
to another. So every process is recorded with its create time, and only a process with
both is signalled. Nothing here matches command lines.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

log = logging.getLogger(__name__)

KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
KILL_WAIT = 5.0  # seconds a SIGKILLed process gets to be gone
POLL = 0.2

# psutil's create time on Linux adds /proc/stat's boot time, a whole number of seconds
# that moves by one when the clock is adjusted; no pid comes back within seconds.
SAME_START = 1.5


@dataclass(frozen=True)
class ProcessRef:
    """A process as the launcher recorded it."""

    pid: int
    create_time: float


def spawn(command: list[str], log_file: Path, cwd: Optional[str] = None,
          env: Optional[dict[str, str]] = None) -> ProcessRef:
    """Start `command` in a session of its own, so that it outlives the launcher and the
    terminal, and its process group (id = its pid) holds what it starts. Its output goes
    to `log_file`, which starts empty: the previous run's stays beside it as LOG.1."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    # Not yet waited for, it exists at least as a zombie, so its create time is there.
    return ProcessRef(proc.pid, psutil.Process(proc.pid).create_time())


def _is(proc: psutil.Process, ref: ProcessRef) -> bool:
    return abs(proc.create_time() - ref.create_time) <= SAME_START


def running(ref: ProcessRef) -> Optional[psutil.Process]:
    """The process `ref` names if it still runs: same pid and create time, not a zombie
    (an exited child of a launcher that has not waited for it yet)."""
    try:
        proc = psutil.Process(ref.pid)
        if _is(proc, ref) and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def group_members(leader: ProcessRef) -> list[psutil.Process]:
    """The live processes of the process group that `leader` (spawned above) leads. The
    group outlives its leader, and the system hands out no pid that is still a group's
    id: so if the leader's pid now belongs to another process, our group is gone."""
    try:
        if not _is(psutil.Process(leader.pid), leader):
            return []
    except psutil.NoSuchProcess:
        pass
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == leader.pid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue  # exited meanwhile
    return members


def one(ref: ProcessRef) -> Callable[[], list[psutil.Process]]:
    """For `end` and `wait_gone`: the process `ref` names while it runs."""
    return lambda: [proc for proc in (running(ref),) if proc is not None]


def wait_gone(find: Callable[[], list[psutil.Process]], timeout: float) -> bool:
    """Wait up to `timeout` seconds until `find` finds no process; True once none."""
    deadline = time.monotonic() + timeout
    while find():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def end(find: Callable[[], list[psutil.Process]], what: str, grace: float = KILL_GRACE) -> bool:
    """SIGTERM to what `find` finds, `grace` seconds to exit, then SIGKILL: the one place
    the launcher ends processes. `find` is asked again before each signal, so a group's
    members started meanwhile are ended too. True once nothing is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
        procs = find()
        if not procs:
            return True
        if sig == signal.SIGKILL:
            log.info("%s is still there after SIGTERM: SIGKILL", what)
        for proc in procs:
            try:
                # psutil checks again that the pid is still this process's.
                proc.send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # gone, or not ours to signal: the wait below tells which
        if wait_gone(find, wait):
            return True
    return False
