"""The cluster as `GET /v1/cluster` and the dashboard show it: rank 0's heartbeat (each
rank's record from the start, and rank 0's running figures) and the supervisor's record,
read into typed models."""

from __future__ import annotations

import socket
import time
from typing import Any, Literal

from pydantic import BaseModel

from config import Settings
from http_api.events import heartbeat_problem
from launcher.processes import ProcessRef, running
from spool.protocol import Supervision


class RankStatus(BaseModel):
    """One rank as it started, and whether it still runs."""

    rank: int
    host: str
    pid: int | None = None
    layers: tuple[int, int]  # [start, end): the layers it holds (all of them in tensor mode)
    shard: tuple[int, int] = (0, 1)  # [index, parts]: its part of each layer; (0, 1) in a pipeline
    memory_total_bytes: int | None = None  # the machine's
    memory_available_bytes: int | None = None  # what the machine could give the model at start
    weights_bytes: int | None = None  # this rank's part of the model
    kv_bytes_per_token: int | None = None  # what each token of a sequence costs here
    blas: str | None = None
    device: str | None = None
    # False once the ring is down; for a rank on the API's machine, also whether its
    # process (pid and create time) still runs.
    alive: bool
    started_at: float | None = None  # Unix time its process started
    restarts: int | None = None  # the supervisor's restarts of the ring (ranks restart together)


class Throughput(BaseModel):
    bucket_s: int
    tokens_per_s: list[float]  # oldest first, one per bucket, the last minutes


class ClusterLoad(BaseModel):
    tokens_per_s: float  # over the last whole bucket
    throughput: Throughput
    generated_tokens: int  # since the ring started
    active: int  # sequences being generated
    peak_active: int
    queue_depth: int  # requests waiting in the spool
    kv_reserved_bytes: int
    kv_capacity_bytes: int
    prompt_cache_tokens: int | None  # None: the prompt cache is off
    prompt_cache_hits: int
    prompt_cache_misses: int
    ttft_p50_s: float | None  # over the last requests, from rank 0's claim


class ClusterStatus(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None
    state: str | None  # rank 0's: loading, ready, failed, stopped
    model: str | None  # what rank 0 loaded
    served_names: list[str]  # the names requests give it (SERVED_MODEL_NAME)
    mode: str | None  # pipeline or tensor
    parallel: dict[str, Any]  # how the ranks share the model, and why
    started_at: float | None  # Unix time rank 0's process started
    uptime_s: float | None
    supervisor: Supervision | None  # None when the ring runs without one
    heartbeat_age_s: float | None
    ranks: list[RankStatus]
    load: ClusterLoad
    settings: dict[str, Any]  # the ring's (from its heartbeat) and the API's that matter


def serving_problem(beat: dict | None, supervision: Supervision | None, max_age: float) -> str | None:
    """Why the ring does not serve now (no fresh heartbeat, not ready, the supervisor
    restarting it or given up), or None; what /health and /v1/cluster say."""
    problem = heartbeat_problem(beat, max_age)
    if problem is None and beat.get("state") != "ready":
        problem = f"ring state is {beat.get('state')!r}"
        problem += f": {beat['reason']}" if beat.get("reason") else ""
    if supervision is not None and supervision.state == "gave_up":
        problem = f"the supervisor gave up: {supervision.reason}"
    elif supervision is not None and supervision.state == "restarting" and problem:
        problem = f"the supervisor is restarting the ring ({supervision.last_cause}); {problem}"
    return problem


def _alive(entry: dict, ring_up: bool, here: str) -> bool:
    if not ring_up:
        return False
    if entry.get("host") == here and isinstance(entry.get("pid"), int) and "created" in entry:
        return running(ProcessRef(entry["pid"], entry["created"])) is not None
    return True


def _rank(entry: dict, ring_up: bool, restarts: int | None, here: str) -> RankStatus:
    footprint = entry.get("kv_footprint") or {}
    return RankStatus(
        rank=entry["rank"], host=entry.get("host", "?"), pid=entry.get("pid"),
        layers=tuple((entry.get("layers") or [0, 0])[:2]), shard=tuple((entry.get("shard") or [0, 1])[:2]),
        memory_total_bytes=entry.get("memory_total"), memory_available_bytes=entry.get("memory"),
        weights_bytes=entry.get("parameter_bytes"), kv_bytes_per_token=footprint.get("per_token"),
        blas=entry.get("blas"), device=entry.get("device"), alive=_alive(entry, ring_up, here),
        started_at=entry.get("created"), restarts=restarts,
    )


def cluster_status(beat: dict | None, supervision: Supervision | None, queue_depth: int, settings: Settings,
                   served_names: list[str]) -> ClusterStatus:
    """The cluster as rank 0's last heartbeat (`beat`) and the supervisor tell it."""
    info = beat or {}
    problem = serving_problem(beat, supervision, settings.heartbeat_timeout)
    now = time.time()
    restarts = supervision.restarts if supervision is not None else None
    ranks = [entry for entry in info.get("ranks") or [] if isinstance(entry, dict)]
    here = socket.gethostname()
    throughput = info.get("throughput") or {"bucket_s": 5, "tokens_per_s": []}
    load = ClusterLoad(
        tokens_per_s=(throughput["tokens_per_s"] or [0.0])[-1] if problem is None else 0.0,
        throughput=Throughput(**throughput), generated_tokens=info.get("generated_tokens", 0),
        active=info.get("active", 0) if problem is None else 0, peak_active=info.get("peak_active", 0),
        queue_depth=queue_depth, kv_reserved_bytes=info.get("kv_reserved_bytes", 0),
        kv_capacity_bytes=info.get("kv_capacity_bytes", 0), prompt_cache_tokens=info.get("prompt_cache_tokens"),
        prompt_cache_hits=info.get("prompt_cache_hits", 0), prompt_cache_misses=info.get("prompt_cache_misses", 0),
        ttft_p50_s=info.get("ttft_p50_s"),
    )
    parallel = info.get("parallel") or {}
    started = ranks[0].get("created") if ranks else None
    api_settings = {"api_key_required": bool(settings.api_key), "default_max_tokens": settings.default_max_tokens,
                    "request_timeout": settings.request_timeout}
    return ClusterStatus(
        status="unavailable" if problem else "ok", reason=problem, state=info.get("state"), model=info.get("model"),
        served_names=served_names, mode=parallel.get("mode"), parallel=parallel, started_at=started,
        uptime_s=round(now - started, 1) if started and problem is None else None, supervisor=supervision,
        heartbeat_age_s=round(now - info["time"], 2) if isinstance(info.get("time"), (int, float)) else None,
        ranks=[_rank(entry, problem is None, restarts, here) for entry in ranks],
        load=load, settings=(info.get("settings") or {}) | api_settings,
    )
