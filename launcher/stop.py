"""Stopping what `start` started: the ring (rank 0 first, so it finishes the token in
flight), then the API. Only processes recorded in the pid files, by pid and create time."""

from __future__ import annotations

import logging

from launcher import LaunchError, processes
from launcher.hosts import Layout
from launcher.readiness import read_heartbeat
from launcher.run_state import API_FILE, RING_FILE, RankProcess, forget, load_api, load_ring, ranks_from_heartbeat

log = logging.getLogger(__name__)

FAULT_GRACE = 2.0  # seconds a failed ring's processes get between SIGTERM and SIGKILL


def stop_ring(layout: Layout, patient: bool = True) -> bool:
    """Rank 0 first: on SIGTERM it finishes the token in flight (its request stays in the
    spool) and releases the other ranks, so the launcher ends by itself. Then the
    launcher's process group, SIGTERM and SIGKILL; then any rank of this run still alive
    on its host (MPI puts local ranks in process groups of their own; remote ranks end
    with their ssh or MPI daemon). Not `patient` (the supervisor, for a ring that failed):
    everything at once, SIGKILL after FAULT_GRACE. False when a rank would not end."""
    settings = layout.settings
    ring = load_ring(settings.run_dir)
    if ring is None:
        log.info("ring: not running")
        return True
    ranks = ring.ranks or this_runs_ranks(layout, ring.since)
    grace = processes.KILL_GRACE if patient else FAULT_GRACE
    if ring.members() and patient:
        rank0 = next((rank for rank in ranks if rank.rank == 0), None)
        if rank0 is not None and rank0.terminate():
            log.info("stopping rank 0 (%s): it finishes the token in flight", rank0)
        if not processes.wait_gone(ring.members, settings.stop_timeout):
            log.info("ranks still running after STOP_TIMEOUT=%d s: SIGTERM to the launcher's process group",
                     settings.stop_timeout)
    processes.end(ring.members, "the launcher's process group", grace)
    stuck = False
    for rank in ranks:
        if not rank.end(f"rank {rank.rank}", grace):
            log.info("rank %d (%s) is still alive: kill it by hand", rank.rank, rank)
            stuck = True
    if stuck:
        return False
    forget(settings.run_dir, RING_FILE)
    log.info("ring stopped")
    return True


def this_runs_ranks(layout: Layout, since: float) -> list[RankProcess]:
    """The ranks of a start that was interrupted before they were saved: from a
    heartbeat of this run, if there is one."""
    beat = read_heartbeat(layout)
    return ranks_from_heartbeat(beat.ranks, layout.machines) if beat.time > since else []


def stop_api(layout: Layout) -> None:
    run_dir = layout.settings.run_dir
    api = load_api(run_dir)
    if api is None:
        log.info("API: not running")
        return
    if not api.end("the API"):
        raise LaunchError(f"the API ({api}) is still alive: kill it by hand")
    forget(run_dir, API_FILE)
    log.info("API stopped")
