"""`status`: the ring, rank 0's heartbeat, how the ranks share the model, each rank
(host, pid, layers, memory, BLAS, shard, alive), the API's health and the batches under
way. Exit status 0 only when all of it is up."""

from __future__ import annotations

from launcher.hosts import HostUnreachable, Layout
from launcher.readiness import Heartbeat, api_url, health, read_heartbeat
from launcher.processes import running
from launcher.run_state import load_supervisor, ranks_from_heartbeat, running_api, running_ring

ROW = "{:<5} {:<22} {:<16} {:<8} {:<8} {:<9} {:<10} {:<6} {}"
ALIVE = {True: "yes", False: "no", None: "unreachable"}


def rank_row(entry: dict, machine: str, alive: str) -> str:
    """One rank's line from its heartbeat record; the BLAS's kind without its library
    path (openblas, reference, accelerate); its shard: `whole` layers (a pipeline), or
    `k/N`, the k-th of N parts of each (tensor parallelism)."""
    start, end = (entry.get("layers") or [0, 0])[:2]
    memory = f"{entry.get('memory', 0) / 2**30:.1f}GiB"
    blas = str(entry.get("blas") or "?").split(" ")[0] or "?"
    index, parts = (entry.get("shard") or [0, 1])[:2]
    shard = "whole" if parts == 1 else f"{index + 1}/{parts}"
    return ROW.format(*map(str, (entry.get("rank"), machine, entry.get("host"), entry.get("pid"),
                                 f"{start}-{end - 1}", memory, blas, shard, alive)))


def parallel_line(parallel: dict) -> str:
    """How the ranks share the model, why, and auto's link figures when it measured."""
    line = f"parallel: {parallel.get('mode')} (PARALLEL={parallel.get('requested')}: {parallel.get('reason')}"
    if "all_reduce_us" in parallel:
        line += (f"; all-reduce {parallel['all_reduce_us']} us, ring trip {parallel.get('ring_trip_us')} us, "
                 f"{parallel.get('bandwidth_mb_s')} MB/s")
    return line + ")"


def status(layout: Layout) -> int:
    settings = layout.settings
    up = True
    ring = running_ring(settings.run_dir)
    if ring is not None:
        print(f"ring: launcher pid {ring.launcher.pid}, {len(layout.machines)} rank(s), BACKEND={settings.backend}")
    else:
        print("ring: not running")
        up = False
    beat = read_heartbeat(layout)
    line = f"heartbeat: {beat.state or 'none'}"
    line += f", {beat.age:.1f} s ago" if beat.age is not None else ""
    line += f", model {beat.model}" if beat.model else ""
    line += f", active {beat.active}" if beat.active else ""
    line += f" ({beat.reason})" if beat.reason else ""
    print(line)
    if beat.state != "ready" or beat.age is None or beat.age > settings.heartbeat_timeout:
        up = False
    if beat.parallel:
        print(parallel_line(beat.parallel))
    print(ROW.format("RANK", "HOST", "HOSTNAME", "PID", "LAYERS", "MEMORY", "BLAS", "SHARD", "ALIVE"))
    ranks = {rank.rank: rank for rank in ranks_from_heartbeat(beat.ranks, layout.machines)}
    for entry in beat.ranks:
        rank = ranks.get(entry.get("rank"))
        alive = rank.alive() if rank is not None else False
        up = up and alive is True
        print(rank_row(entry, str(rank.machine) if rank is not None else "?", ALIVE[alive]))
    up = up and bool(beat.ranks)
    api = running_api(settings.run_dir)
    if api is not None:
        code, reason = health(f"{api_url(layout)}/health")
        print(f"api: {api_url(layout)} ({api}): /health {code} {reason}")
        up = up and code == 200
    else:
        print("api: not running")
        up = False
    supervised = supervisor_line(layout, beat)
    for line in batch_lines(layout):
        print(line)
    return 0 if supervised and up else 1


def supervisor_line(layout: Layout, beat: Heartbeat) -> bool:
    """The supervisor's state, restarts and last cause; False when it should run and does not."""
    ref = load_supervisor(layout.settings.run_dir)
    alive = ref is not None and running(ref) is not None
    line = f"supervisor: pid {ref.pid}" if alive else "supervisor: not running"
    record = beat.supervision
    if record is not None:
        line += f", {record.state.replace('_', ' ')}; ring restarts {record.restarts}, API restarts {record.api_restarts}"
        line += f"; last cause: {record.last_cause}" if record.last_cause else ""
        line += f"; gave up: {record.reason}" if record.state == "gave_up" else ""
    print(line + ("" if layout.settings.supervise else " (SUPERVISE=false)"))
    return alive or not layout.settings.supervise


def batch_lines(layout: Layout) -> list[str]:
    """A line per batch under way, from the spool on rank 0's host (the API's)."""
    try:
        under_way = layout.rank0.task("batches", layout.rank0.path(layout.settings.spool_dir))
    except HostUnreachable:
        return []
    return [f"batch {b['id']}: {b['status']}, {b['completed'] + b['failed']}/{b['total']} lines answered "
            f"({b['failed']} failed)" for b in under_way]
