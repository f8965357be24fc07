"""launcher/processes.py on real processes: identity by pid and create time, process
groups, and the one SIGTERM → wait → SIGKILL."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from launcher.processes import ProcessRef, end, group_members, one, running, spawn, wait_gone

# Ignores SIGTERM, says so, and sleeps: only SIGKILL ends it.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"


def wait_for_line(log: Path, text: str) -> None:
    assert wait_gone(lambda: [] if log.exists() and text in log.read_text() else [True], 30), log.read_text()


def test_a_recycled_pid_is_not_ours_and_is_never_signalled() -> None:
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        created = psutil.Process(stranger.pid).create_time()
        recycled = ProcessRef(stranger.pid, created - 60)  # ours ran a minute earlier
        assert running(ProcessRef(stranger.pid, created)) is not None
        assert running(recycled) is None
        assert group_members(recycled) == [], "its group is the stranger's, not ours"
        assert end(one(recycled), "ours", grace=1)  # nothing of ours is left ...
        assert end(lambda: group_members(recycled), "our group", grace=1)
        assert stranger.poll() is None  # ... and the stranger was not touched
    finally:
        stranger.kill()
        stranger.wait()


def test_end_escalates_to_sigkill_for_a_process_that_ignores_sigterm(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "stubborn.log"
    ref = spawn([sys.executable, "-c", STUBBORN], log)
    wait_for_line(log, "ready")
    with caplog.at_level(logging.INFO):
        assert end(one(ref), "the stubborn one", grace=0.5)
    assert "the stubborn one is still there after SIGTERM: SIGKILL" in caplog.text
    assert running(ref) is None


def test_a_group_outlives_its_leader_and_ends_with_its_members(tmp_path: Path) -> None:
    """spawn's process leads a group; a member it leaves behind still counts and is ended."""
    log = tmp_path / "group.log"
    child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {STUBBORN!r}]); print('started', flush=True)"
    leader = spawn([sys.executable, "-c", child], log)
    wait_for_line(log, "ready")
    members = group_members(leader)
    assert len(members) == 1 and members[0].pid != leader.pid, "the leader exited, its child stays in the group"
    assert end(lambda: group_members(leader), "the group", grace=0.5)
    assert not members[0].is_running() or members[0].status() == psutil.STATUS_ZOMBIE


def test_spawn_keeps_the_previous_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    for word in ("first", "second"):
        ref = spawn([sys.executable, "-c", f"print({word!r})"], log)
        assert wait_gone(one(ref), 30)
    assert log.read_text() == "second\n" and (tmp_path / "x.log.1").read_text() == "first\n"
