"""The cluster's routes over real HTTP: `GET /v1/cluster` and its server-sent events read
from rank 0's real heartbeat (two ranks under MPI, the tiny llama split by layers), and
`POST /v1/cluster/reset_prefix_cache` carried through the spool to rank 0, which drops
the prompt cache on every rank, so the next identical prompt reuses nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from harness import AUTH, ApiServer, RankProcess, error_body, api_settings_for, wait_for, ring_and_api

from distributed.serving_stats import BUCKET_S, BUCKETS, ServingStats
from http_api.cluster_view import ClusterStatus
from models.tiny import make_tiny_model
from spool.protocol import Supervision

LAYERS = 6  # the tiny llama's
MESSAGES = [{"role": "user", "content": "Tell me about the lighthouse on the northern cape."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def served(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, RankProcess]]:
    with ring_and_api(model, tmp_path_factory.mktemp("ring") / "spool", ranks=2,
                      api_settings={"served_model_name": "tiny"}) as both:
        yield both


def _cluster(api: ApiServer) -> ClusterStatus:
    response = httpx.get(f"{api.url}/v1/cluster", headers=AUTH)
    assert response.status_code == 200, response.text
    return ClusterStatus.model_validate(response.json())


def _cached_tokens(api: ApiServer) -> tuple[int, int]:
    """One greedy chat of MESSAGES: its prompt tokens and how many came from the prompt cache."""
    reply = api.client(timeout=120).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                                           temperature=0)
    return reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens


def test_serving_stats() -> None:
    """Rank 0's figures: tokens/s per whole bucket of the last minutes (the one under way
    left out), the median time to first token, prompt-cache hits and misses."""
    now = 100 * BUCKET_S
    stats = ServingStats(clock=lambda: now)
    for _ in range(10):
        stats.token()
    now += 2 * BUCKET_S + 1  # a bucket with nothing, then one with 5 tokens
    for _ in range(5):
        stats.token()
    assert stats.throughput()[-2:] == [10 / BUCKET_S, 0.0]  # the bucket of the 5 is under way
    now += BUCKET_S
    rates = stats.throughput()
    assert len(rates) == BUCKETS and rates[-3:] == [10 / BUCKET_S, 0.0, 5 / BUCKET_S] and sum(rates[:-3]) == 0
    for ttft, cached in ((0.2, 0), (0.4, 12), (0.3, 0)):
        stats.answered(ttft, cached)
    record = stats.record()
    assert (record["generated_tokens"], record["ttft_p50_s"]) == (15, 0.3)
    assert (record["prompt_cache_hits"], record["prompt_cache_misses"]) == (1, 2)
    now += BUCKETS * BUCKET_S  # out of the window
    assert sum(stats.throughput()) == 0


def test_without_a_ring(model: Path, tmp_path: Path) -> None:
    with ApiServer(api_settings_for(model, tmp_path / "spool")) as api:
        assert httpx.get(f"{api.url}/v1/cluster").status_code == 401  # the key is needed on /v1/
        assert httpx.post(f"{api.url}/v1/cluster/reset_prefix_cache").status_code == 401
        status = _cluster(api)
        assert status.status == "unavailable" and status.reason == "no heartbeat from rank 0"
        assert status.ranks == [] and status.load.active == 0 and status.settings["api_key_required"] is True
        response = api.post("/v1/cluster/reset_prefix_cache", {})
        assert response.status_code == 503 and error_body(response)["code"] == "ring_unavailable"
        assert not list((tmp_path / "spool" / "control").iterdir())  # nothing queued
        response = api.post("/v1/cluster/reset_prefix_cache", {"everything": True})
        assert response.status_code == 400 and error_body(response)["param"] == "everything"


def test_cluster_shape(served: tuple[ApiServer, RankProcess]) -> None:
    api, _ = served
    status = _cluster(api)
    assert status.status == "ok" and status.state == "ready" and status.mode == "pipeline"
    assert status.served_names == ["tiny"] and status.model.endswith("llama")
    assert [r.rank for r in status.ranks] == [0, 1]
    # Whole layers, one after the other, all of them once.
    assert [r.layers for r in status.ranks] == [(0, LAYERS // 2), (LAYERS // 2, LAYERS)]
    assert all(r.shard == (0, 1) for r in status.ranks)
    for rank in status.ranks:
        assert rank.alive and rank.device == "cpu" and rank.blas
        assert 0 < rank.weights_bytes < rank.memory_total_bytes and rank.kv_bytes_per_token > 0
    assert 0 < status.uptime_s < 600 and status.heartbeat_age_s < 5
    assert status.started_at == status.ranks[0].started_at
    assert status.settings["parallel"] == "pipeline" and status.settings["backend"] == "mpi"
    load = status.load
    assert load.kv_capacity_bytes == status.settings["kv_cache_reserved_memory_mb"] * 2**20
    assert load.throughput.bucket_s * len(load.throughput.tokens_per_s) == 300


def test_figures_follow_the_requests(served: tuple[ApiServer, RankProcess]) -> None:
    api, _ = served
    before = _cluster(api).load
    prompt_tokens, _ = _cached_tokens(api)
    assert wait_for(lambda: _cluster(api).load.generated_tokens >= before.generated_tokens + 8, timeout=5)
    after = _cluster(api).load
    assert after.ttft_p50_s is not None and after.ttft_p50_s > 0
    lookups = after.prompt_cache_hits + after.prompt_cache_misses
    assert lookups == before.prompt_cache_hits + before.prompt_cache_misses + 1
    assert after.prompt_cache_tokens >= prompt_tokens  # what the request left behind
    # Its tokens show in the throughput of one of the last buckets, once that bucket is over.
    bucket = after.throughput.bucket_s
    assert wait_for(lambda: sum(_cluster(api).load.throughput.tokens_per_s) * bucket >= 8, timeout=bucket + 3)


def test_cluster_events_stream(served: tuple[ApiServer, RankProcess]) -> None:
    api, _ = served
    seen: list[ClusterStatus] = []
    started = time.monotonic()
    with httpx.stream("GET", f"{api.url}/v1/cluster/events", headers=AUTH, timeout=10) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                assert event == "cluster"
                seen.append(ClusterStatus.model_validate(json.loads(line[len("data: "):])))
                if len(seen) == 2:
                    break
    assert 0.8 < time.monotonic() - started < 5  # one now, the next a second later
    assert [len(s.ranks) for s in seen] == [2, 2] and seen[1].heartbeat_age_s is not None


def test_reset_prefix_cache_makes_the_next_prompt_a_miss(served: tuple[ApiServer, RankProcess]) -> None:
    api, _ = served
    prompt_tokens, _ = _cached_tokens(api)
    _, cached = _cached_tokens(api)
    assert cached == prompt_tokens - 1  # all but the last prompt token came from the cache
    response = api.post("/v1/cluster/reset_prefix_cache", {})
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["action"] == "reset_prefix_cache" and done["dropped_entries"] >= 1
    assert done["dropped_tokens"] >= prompt_tokens - 1
    assert wait_for(lambda: _cluster(api).load.prompt_cache_tokens == 0, timeout=5)
    _, cached = _cached_tokens(api)
    assert cached == 0
    _, cached = _cached_tokens(api)
    assert cached == prompt_tokens - 1  # and the cache works again after it
    # Without a body it is the same; the answer leaves nothing behind in the spool.
    response = httpx.post(f"{api.url}/v1/cluster/reset_prefix_cache", headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.json()["dropped_entries"] >= 1
    assert not list((api.settings.spool_dir / "control").iterdir())


def test_supervisor_and_restarts(served: tuple[ApiServer, RankProcess]) -> None:
    """Restarts are the supervisor's (launcher/supervisor.py writes its record in the
    spool); a ring started again has new processes and a new start time."""
    api, ring = served
    first = _cluster(api)
    assert first.supervisor is None and [r.restarts for r in first.ranks] == [None, None]
    ring.stop()
    ring.start()
    again = _cluster(api)
    assert again.status == "ok" and again.started_at > first.started_at
    assert [r.pid for r in again.ranks] != [r.pid for r in first.ranks]
    try:
        api.spool.write_supervision(Supervision(state="watching", restarts=2, last_cause="rank 1 exited"))
        status = _cluster(api)
        assert status.status == "ok" and status.supervisor.last_cause == "rank 1 exited"
        assert [r.restarts for r in status.ranks] == [2, 2]
        api.spool.write_supervision(Supervision(state="gave_up", restarts=5, reason="RESTART_LIMIT reached"))
        status = _cluster(api)
        assert status.status == "unavailable" and "gave up: RESTART_LIMIT reached" in status.reason
        response = api.post("/v1/cluster/reset_prefix_cache", {})
        assert response.status_code == 503 and error_body(response)["code"] == "ring_unavailable"
    finally:
        api.spool.write_supervision(None)
