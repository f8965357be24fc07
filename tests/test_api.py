"""The HTTP front over real HTTP: uvicorn on a free port, httpx and the official openai client.

The first tests need no generation and run with no rank at all (or, for the 504 and the
queued-disconnect cases, with a heartbeat the test writes itself: a ring that looks up but
never claims). Everything that generates runs against the real rank 0 (`python server.py`
in serve mode, a world of one) on a tiny model, and compares what it gets with
single-process mlx-lm.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import mlx_lm
import openai
import pytest
from conftest import rank_env
from harness import (
    KEY, AUTH, MAX_BYTES, MAX_SEQ, RING_MAX_SEQ, ApiServer, RankProcess, ring_and_api, api_settings_for,
    error_body, wait_for, ring_settings_for, mlx_lm_greedy, spooled_request, metric_value
)

from api import SHUTDOWN_GRACE
from http_api.events import HEARTBEAT_CHECK, KEEPALIVE_EVERY
from config import REPO_DIR
from spool import Spool
from spool.notify import watchfiles_watch
from spool.protocol import Delta, Event, Final, SamplingParams, SpoolRequest, Supervision
from models.tiny import VOCAB_SIZE, make_tiny_model

# Greedy decoding of the tiny model never reaches EOS within LONG_TOKENS for this prompt,
# and LONG_TOKENS take it tens of seconds: long enough to act on a generation under way.
LONG_MESSAGES = [{"role": "user", "content": "Tell me about the harbour town of Wexley."}]
LONG_TOKENS = 3000


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def api_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with ApiServer(api_settings_for(tiny_model, tmp_path_factory.mktemp("spool"))) as server:
        yield server


@pytest.fixture
def api(api_server: ApiServer) -> ApiServer:
    """The module's server with an empty spool and no heartbeat."""
    root = api_server.settings.spool_dir
    for sub in ("incoming", "claimed", "done", "streams", "cancel"):
        for path in (root / sub).iterdir():
            path.unlink()
    (root / "heartbeat.json").unlink(missing_ok=True)
    return api_server


def _chat(**extra) -> dict:
    return {"model": "MODEL", "messages": [{"role": "user", "content": "Say hello"}], **extra}


def _sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response, JSON-decoded except the final [DONE]."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _files(api: ApiServer, sub: str) -> list[Path]:
    return list((api.settings.spool_dir / sub).iterdir())


@pytest.fixture
def model_id(api: ApiServer) -> str:
    return api.settings.model_repo


# ---------------------------------------------------------------------------
# Without a producer
# ---------------------------------------------------------------------------


def test_models_lists_the_served_model(api: ApiServer, model_id: str) -> None:
    models = api.client().models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].object == "model"


def test_api_key_is_required_on_v1_only(api: ApiServer, model_id: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(f"{api.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert error_body(response)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{api.url}/metrics").status_code == 200
    assert httpx.get(f"{api.url}/health").status_code == 503  # no heartbeat, but not 401


def test_unknown_model_is_404(api: ApiServer) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        api.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    assert err.value.body["param"] == "model"


def test_body_too_large_is_413(api: ApiServer, model_id: str) -> None:
    big = _chat(model=model_id, messages=[{"role": "user", "content": "x" * MAX_BYTES}])
    response = api.post("/v1/chat/completions", big)
    assert response.status_code == 413 and error_body(response)["code"] == "request_too_large"
    # Without Content-Length (chunked upload) the limit holds as the body arrives.
    data = json.dumps(big).encode()
    chunks = (data[i:i + 1000] for i in range(0, len(data), 1000))
    response = httpx.post(f"{api.url}/v1/chat/completions", content=chunks, headers=AUTH)
    assert response.status_code == 413 and error_body(response)["code"] == "request_too_large"
    assert not _files(api, "incoming")


@pytest.mark.parametrize(("patch", "param"), [
    ({"n": 17}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stop": ""}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages.0.content"),
    ({"model": None}, "model"),
])
def test_invalid_fields_are_400_with_param(api: ApiServer, model_id: str, patch: dict, param: str) -> None:
    response = api.post("/v1/chat/completions", _chat(model=model_id) | patch)
    assert response.status_code == 400, response.text
    error = error_body(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_invalid_json_and_missing_prompt_are_400(api: ApiServer, model_id: str) -> None:
    response = httpx.post(f"{api.url}/v1/chat/completions", content=b"{oops",
                          headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in error_body(response)["message"]
    response = api.post("/v1/completions", {"model": model_id})
    assert response.status_code == 400 and error_body(response)["param"] == "prompt"
    response = api.post("/v1/completions", {"model": model_id, "prompt": ""})
    assert response.status_code == 400 and error_body(response)["param"] == "prompt"


def test_context_length_exceeded(api: ApiServer, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.client().chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=MAX_SEQ)
    assert err.value.code == "context_length_exceeded"
    assert f"maximum context length is {MAX_SEQ} tokens" in err.value.message
    assert f"{MAX_SEQ} in the completion" in err.value.message
    # A prompt that fills the context on its own fails even with the default max_tokens.
    response = api.post("/v1/completions", {"model": model_id, "prompt": "1 2 3 4 5 6 7 8 9 " * 60})
    assert response.status_code == 400 and error_body(response)["code"] == "context_length_exceeded"
    assert not _files(api, "incoming")


def test_ring_down_is_503_and_queues_nothing(api: ApiServer, model_id: str) -> None:
    response = api.post("/v1/chat/completions", _chat(model=model_id))
    assert response.status_code == 503 and "no heartbeat" in error_body(response)["message"]
    api.spool.write_heartbeat({"state": "ready", "time": time.time() - 60})  # older than RING_DOWN_AFTER
    response = api.post("/v1/chat/completions", _chat(model=model_id, stream=True))
    assert response.status_code == 503 and "60" in error_body(response)["message"]
    assert error_body(response)["type"] == "server_error"
    assert not _files(api, "incoming")


def test_health(api: ApiServer) -> None:
    response = httpx.get(f"{api.url}/health")
    assert response.status_code == 503 and response.json()["reason"] == "no heartbeat from rank 0"
    api.spool.write_heartbeat({"state": "loading", "ranks": 2})
    response = httpx.get(f"{api.url}/health")
    assert response.status_code == 503 and "loading" in response.json()["reason"]
    api.spool.write_heartbeat({"state": "ready", "ranks": 2, "active": 0})
    response = httpx.get(f"{api.url}/health")
    assert response.status_code == 200
    assert response.json() | {"time": 0} == {"status": "ok", "reason": None, "queue_depth": 0, "state": "ready",
                                              "ranks": 2, "active": 0, "time": 0, "supervisor": None}
    watching = Supervision(state="watching", restarts=2, last_cause="rank 1 exited")
    api.spool.write_supervision(watching)
    response = httpx.get(f"{api.url}/health")
    assert response.status_code == 200 and response.json()["supervisor"] == watching.model_dump()
    api.spool.write_supervision(Supervision(state="gave_up", restarts=5, reason="RESTART_LIMIT=5 reached"))
    response = httpx.get(f"{api.url}/health")
    assert response.status_code == 503 and response.json()["reason"] == "the supervisor gave up: RESTART_LIMIT=5 reached"
    api.spool.write_supervision(None)
    api.spool.write_heartbeat({"state": "ready", "time": time.time() - 5})  # > HEARTBEAT_TIMEOUT
    response = httpx.get(f"{api.url}/health")
    assert response.status_code == 503 and "ago" in response.json()["reason"]


def test_timeout_is_504_and_cancels(tiny_model: Path, tmp_path: Path) -> None:
    with ApiServer(api_settings_for(tiny_model, tmp_path / "spool", request_timeout=0.5)) as api:
        api.spool.write_heartbeat({"state": "ready"})  # alive, but nobody claims
        for stream in (False, True):
            started = time.monotonic()
            response = api.post("/v1/chat/completions", _chat(model=str(tiny_model), stream=stream))
            assert response.status_code == 504 and error_body(response)["code"] == "timeout"
            assert 0.5 <= time.monotonic() - started < 3
        assert len(_files(api, "cancel")) == 2
        assert api.spool.queue_depth() == 0  # withdrawn, so a ring coming back skips them


def test_client_disconnect_while_queued_cancels(api: ApiServer, model_id: str) -> None:
    api.spool.write_heartbeat({"state": "ready"})
    for stream in (False, True):
        with pytest.raises(httpx.ReadTimeout):
            api.post("/v1/chat/completions", _chat(model=model_id, stream=stream), timeout=0.3)
    assert wait_for(lambda: len(_files(api, "cancel")) == 2, timeout=3)
    assert api.spool.queue_depth() == 0


# ---------------------------------------------------------------------------
# Against the real rank 0: server.py in serve mode
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_ring(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, RankProcess]]:
    """`python server.py` (one rank) and the API on one spool, both on the tiny model."""
    with ring_and_api(tiny_model, tmp_path_factory.mktemp("ring") / "spool") as served:
        yield served


@pytest.fixture
def ring(real_ring: tuple[ApiServer, RankProcess]) -> ApiServer:
    return real_ring[0]


def _events(api: ApiServer, request_id: str) -> list[Event]:
    return api.spool.read_events(request_id)[0]


def test_chat_non_streaming(ring: ApiServer, tiny_model: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tokenizer = mlx_lm.utils.load_tokenizer(tiny_model)
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    reference = mlx_lm_greedy(tiny_model, prompt, 8)
    # A stop string the greedy output reaches with its sixth token, and not before.
    stop, before = reference.segments[5], "".join(reference.segments[:5])
    assert stop and reference.text.find(stop) == len(before), reference.segments
    model = str(tiny_model)
    reply = ring.client().chat.completions.create(model=model, messages=messages, temperature=0, seed=7,
                                                  stop=stop, max_completion_tokens=8)
    assert reply.object == "chat.completion" and reply.model == model
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == before
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 6
    sent = spooled_request(ring, reply.id.removeprefix("chatcmpl-"))
    sampling = SamplingParams(temperature=0.0, seed=7)
    assert sent == SpoolRequest(kind="chat", model=model, prompt_tokens=prompt, max_tokens=8, sampling=sampling,
                                stop=[stop], created=sent.created)


def test_chat_streaming_with_usage(ring: ApiServer, tiny_model: Path) -> None:
    body = _chat(model=str(tiny_model), stream=True, stream_options={"include_usage": True}, temperature=0)
    reference = mlx_lm_greedy(tiny_model, body["messages"], 16)  # DEFAULT_MAX_TOKENS
    with httpx.stream("POST", f"{ring.url}/v1/chat/completions", headers=AUTH, timeout=60, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert "".join(texts) == reference.text
    request_id = chunks[0]["id"].removeprefix("chatcmpl-")
    # One chunk for each piece of text rank 0 wrote, as it wrote it.
    assert texts == [e.text for e in _events(ring, request_id) if isinstance(e, Delta) and e.text]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": reference.finish_reason,
                                        "logprobs": None}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(reference.token_ids)
    assert spooled_request(ring, request_id).max_tokens == 16  # DEFAULT_MAX_TOKENS


def test_stream_opens_once_rank_0_starts_the_request(tiny_model: Path, tmp_path: Path) -> None:
    """The headers and the role chunk go out when rank 0 admits the request, not with its
    first token: with rank 1 of a 2-rank ring stopped no token can come, and yet the stream
    is open. Once rank 1 goes on, the output equals mlx-lm's."""
    messages = [{"role": "user", "content": "hi"}]
    reference = mlx_lm_greedy(tiny_model, messages, 8)
    body = {"model": str(tiny_model), "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    with ring_and_api(tiny_model, tmp_path / "spool", ranks=2) as (api, rank):
        follower = next(r["pid"] for r in rank.spool.read_heartbeat()["ranks"] if r["rank"] == 1)
        os.kill(follower, signal.SIGSTOP)
        try:
            with httpx.stream("POST", f"{api.url}/v1/chat/completions", headers=AUTH, json=body,
                              timeout=60) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                opening = next(json.loads(line[6:]) for line in lines if line.startswith("data: {"))
                assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                request_id = opening["id"].removeprefix("chatcmpl-")
                assert [e.type for e in _events(api, request_id)] == ["started"]
                os.kill(follower, signal.SIGCONT)
                rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        finally:
            os.kill(follower, signal.SIGCONT)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in rest) == reference.text
    assert rest[-1]["choices"][0]["finish_reason"] == reference.finish_reason


def test_waiting_on_a_stalled_ring_is_bounded(tiny_model: Path, tmp_path: Path) -> None:
    """Rank 1 stopped mid-request stalls the ring and rank 0's heartbeat: an open stream gets
    keep-alive comments, then, once the heartbeat is older than RING_DOWN_AFTER, an error
    event in OpenAI's envelope; a non-streaming request gets a 503. Both are cancelled."""
    ring_down_after = KEEPALIVE_EVERY + 3
    rank = RankProcess(tiny_model, tmp_path / "spool", ranks=2)
    settings = ring_settings_for(tiny_model, tmp_path / "spool", ring_down_after=ring_down_after)
    body = {"model": str(tiny_model), "messages": LONG_MESSAGES, "max_tokens": LONG_TOKENS, "temperature": 0}
    with ApiServer(settings) as api:
        rank.start()
        follower = next(r["pid"] for r in rank.spool.read_heartbeat()["ranks"] if r["rank"] == 1)
        os.kill(follower, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with httpx.stream("POST", f"{api.url}/v1/chat/completions", headers=AUTH, json=body | {"stream": True},
                              timeout=60) as response:
                assert response.status_code == 200  # rank 0 admitted it, then stalled
                waiting = ThreadPoolExecutor(1).submit(api.post, "/v1/chat/completions", body, timeout=60)
                lines = [line for line in response.iter_lines() if line]
            took = time.monotonic() - started
            assert ": keep-alive" in lines, lines
            error = json.loads(lines[-1].removeprefix("data: "))["error"]
            assert error["code"] == "ring_unavailable" and "RING_DOWN_AFTER" in error["message"], error
            assert took < ring_down_after + 2 * HEARTBEAT_CHECK + 1, took
            refused = waiting.result()
            assert refused.status_code == 503 and error_body(refused)["code"] == "ring_unavailable"
            assert len(_files(api, "cancel")) == 2
        finally:
            os.kill(follower, signal.SIGCONT)
            rank.stop(kill=True)


def test_an_idle_rank_0_reports_a_dead_follower_itself(tiny_model: Path, tmp_path: Path) -> None:
    """A follower killed while the ring is idle: rank 0 learns it from its doorbell at its
    next poll, not at its next request, and /health says which rank is gone."""
    with ring_and_api(tiny_model, tmp_path / "spool", ranks=2) as (api, rank):
        follower = next(r["pid"] for r in rank.spool.read_heartbeat()["ranks"] if r["rank"] == 1)
        os.kill(follower, signal.SIGKILL)
        assert wait_for(lambda: httpx.get(f"{api.url}/health").status_code == 503, timeout=10)
        health = httpx.get(f"{api.url}/health").json()
        assert "ring broken: rank 1 is gone" in health["reason"], health


def test_openai_client_streaming(ring: ApiServer, tiny_model: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    reference = mlx_lm_greedy(tiny_model, messages, 16)
    stream = ring.client().chat.completions.create(model=str(tiny_model), messages=messages, temperature=0,
                                                   stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == reference.finish_reason
    assert all(c.usage is None for c in chunks)


def test_completions(ring: ApiServer, tiny_model: Path) -> None:
    client, model = ring.client(), str(tiny_model)
    prompt = mlx_lm.utils.load_tokenizer(tiny_model).encode("Once upon a time")
    reference = mlx_lm_greedy(tiny_model, prompt, 5)
    reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == reference.text
    assert reply.choices[0].finish_reason == reference.finish_reason
    assert reply.usage.completion_tokens == len(reference.token_ids)
    sent = spooled_request(ring, reply.id.removeprefix("cmpl-"))
    assert sent.prompt_tokens == prompt and sent.kind == "completion" and sent.max_tokens == 5
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.text
    assert chunks[-2].choices[0].finish_reason == reference.finish_reason
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_real_ring_greedy_matches_mlx_lm(ring: ApiServer, tiny_model: Path) -> None:
    messages = [{"role": "user", "content": "Tell me about the harbour town of Wexley."}]
    reference = mlx_lm_greedy(tiny_model, messages, max_tokens=12)
    client = ring.client()
    model = str(tiny_model)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == reference.text
    assert reply.choices[0].finish_reason == reference.finish_reason
    assert reply.usage.completion_tokens == len(reference.token_ids)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference.text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_real_ring_completion_and_health(ring: ApiServer, tiny_model: Path) -> None:
    reply = ring.client().completions.create(model=str(tiny_model), prompt="The harbour", max_tokens=5,
                                             temperature=0)
    assert reply.usage.completion_tokens <= 5 and reply.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{ring.url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("watcher", ["polling", "watchfiles"])
def test_readers_without_inotify(real_ring: tuple[ApiServer, RankProcess], tiny_model: Path, monkeypatch,
                                 watcher: str) -> None:
    """A second front on the real rank's spool, whose stream readers poll (no
    notifications at all) or are woken by watchfiles (as on macOS)."""
    watch = (lambda self: None) if watcher == "polling" else (lambda self: watchfiles_watch(self.root / "streams", True))
    monkeypatch.setattr(Spool, "watch_streams", watch)
    messages = [{"role": "user", "content": "hi"}]
    reference = mlx_lm_greedy(tiny_model, messages, 16)
    with ApiServer(ring_settings_for(tiny_model, real_ring[0].settings.spool_dir)) as api:
        chunks = list(api.client().chat.completions.create(model=str(tiny_model), messages=messages,
                                                           temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text


def _long_stream(api: ApiServer, model: Path):
    """A streaming request for LONG_TOKENS tokens, as an open `httpx.stream` context."""
    body = {"model": str(model), "messages": LONG_MESSAGES, "max_tokens": LONG_TOKENS, "temperature": 0,
            "stream": True}
    return httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def _finished_cancelled(api: ApiServer, request_id: str) -> Final:
    """The final event rank 0 wrote for a request it stopped because of a cancel marker."""
    assert wait_for(lambda: api.spool.is_cancelled(request_id), timeout=5), "no cancel marker"
    assert wait_for(lambda: (api.settings.spool_dir / "done" / f"{request_id}.json").exists(), timeout=10), \
        "rank 0 did not stop the request"
    final = _events(api, request_id)[-1]
    assert isinstance(final, Final) and final.finish_reason == "cancelled", final
    assert final.usage.completion_tokens < LONG_TOKENS
    return final


def test_top_k_is_checked_against_the_vocabulary(ring: ApiServer, tiny_model: Path) -> None:
    """A top_k mlx-lm's sampler would raise on inside rank 0's step is refused before it is
    queued; the largest it accepts runs, and the ring stays up."""
    client, model = ring.client(), str(tiny_model)
    messages = [{"role": "user", "content": "hi"}]
    for top_k in (VOCAB_SIZE, 10**6):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=messages, max_tokens=2, extra_body={"top_k": top_k})
        assert err.value.body["param"] == "top_k" and str(VOCAB_SIZE) in err.value.body["message"]
    for top_k in (0, 1, VOCAB_SIZE - 1):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=2, seed=1,
                                               extra_body={"top_k": top_k})
        assert reply.usage.completion_tokens >= 1
    assert httpx.get(f"{ring.url}/health").status_code == 200


def test_metrics_text(ring: ApiServer, tiny_model: Path) -> None:
    before = httpx.get(f"{ring.url}/metrics").text
    reply = ring.client().chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=8, temperature=0)
    text = httpx.get(f"{ring.url}/metrics").text
    for name in ("mlx_ring_http_requests_total", "mlx_ring_prompt_tokens_total",
                 "mlx_ring_completion_tokens_total", "mlx_ring_time_to_first_token_seconds_bucket",
                 "mlx_ring_inter_token_latency_seconds_bucket", "mlx_ring_queue_depth",
                 "mlx_ring_active_sequences"):
        assert name in text, name
    assert 'mlx_ring_http_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert metric_value(text, "mlx_ring_queue_depth") == 0
    deltas = [e for e in _events(ring, reply.id.removeprefix("chatcmpl-")) if isinstance(e, Delta)]
    assert len(deltas) >= 2
    for name, grew in (("mlx_ring_completion_tokens_total", reply.usage.completion_tokens),
                       ("mlx_ring_prompt_tokens_total", reply.usage.prompt_tokens),
                       ("mlx_ring_time_to_first_token_seconds_count", 1),
                       ("mlx_ring_inter_token_latency_seconds_count", len(deltas) - 1)):
        assert metric_value(text, name) - metric_value(before, name) == grew, name

    def active() -> float:
        return metric_value(httpx.get(f"{ring.url}/metrics").text, "mlx_ring_active_sequences")

    # The gauge follows rank 0's heartbeat: one sequence while it generates, none after.
    with _long_stream(ring, tiny_model) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept open: a closed iterator closes the connection
        first = next(json.loads(line[6:]) for line in lines if line.startswith("data: {"))
        request_id = first["id"].removeprefix("chatcmpl-")
        assert wait_for(lambda: active() == 1, timeout=10)
    _finished_cancelled(ring, request_id)
    assert wait_for(lambda: active() == 0, timeout=10)


def test_client_disconnect_mid_stream_cancels(ring: ApiServer, tiny_model: Path) -> None:
    client, model = ring.client(), str(tiny_model)
    stream = client.chat.completions.create(model=model, messages=LONG_MESSAGES, max_tokens=LONG_TOKENS,
                                            temperature=0, stream=True)
    for i, chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    _finished_cancelled(ring, chunk.id.removeprefix("chatcmpl-"))
    # The ring is free again: the next request is served, and right.
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == mlx_lm_greedy(tiny_model, messages, 8).text


def test_stopping_the_api_cancels_its_open_streams(real_ring: tuple[ApiServer, RankProcess], tiny_model: Path,
                                                  tmp_path: Path) -> None:
    """`python api.py` as launch.sh runs it gets SIGTERM with a stream open: it ends the stream,
    cancels its request on the ring, and exits by itself, long before launch.sh would SIGKILL it."""
    spool_dir = real_ring[0].settings.spool_dir
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = rank_env({"MODEL_REPO": str(tiny_model), "SPOOL_DIR": str(spool_dir), "API_PORT": str(port),
                    "MAX_SEQUENCE_LENGTH": str(RING_MAX_SEQ)})
    with open(tmp_path / "api.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO_DIR / "api.py")], cwd=REPO_DIR, env=env, stdout=log,
                                stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None
        assert wait_for(healthy, timeout=60) and proc.poll() is None, (tmp_path / "api.log").read_text()
        body = {"model": str(tiny_model), "messages": LONG_MESSAGES, "max_tokens": LONG_TOKENS, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(json.loads(line[6:]) for line in lines if line.startswith("data: {"))
            proc.terminate()
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in lines:
                    pass
        proc.wait(timeout=SHUTDOWN_GRACE + 5)
    finally:
        proc.kill()
        proc.wait()
    _finished_cancelled(real_ring[0], first["id"].removeprefix("chatcmpl-"))


def test_timeout_mid_stream_is_an_sse_error(real_ring: tuple[ApiServer, RankProcess], tiny_model: Path) -> None:
    """Output has begun, so the 504 comes as an error event in OpenAI's envelope."""
    spool_dir = real_ring[0].settings.spool_dir
    with ApiServer(ring_settings_for(tiny_model, spool_dir, request_timeout=1.5)) as api:
        stream = api.client().chat.completions.create(model=str(tiny_model), messages=LONG_MESSAGES,
                                                      max_tokens=LONG_TOKENS, temperature=0, stream=True)
        chunks = []
        with pytest.raises(openai.APIError, match="REQUEST_TIMEOUT") as err:
            for chunk in stream:
                chunks.append(chunk)
        assert err.value.body["code"] == "timeout" and err.value.body["type"] == "server_error"
        assert any(c.choices[0].delta.content for c in chunks)
        _finished_cancelled(api, chunks[0].id.removeprefix("chatcmpl-"))


def test_rank_refusal_keeps_its_status(tiny_model: Path, tmp_path: Path) -> None:
    """A rank whose KV budget (1 MB: a few hundred tokens of the tiny model) is below
    MAX_SEQUENCE_LENGTH: the API lets the request through, rank 0 refuses it, and the
    client gets the rank's error with its status, streaming or not."""
    with ring_and_api(tiny_model, tmp_path / "spool", KV_CACHE_RESERVED_MEMORY_MB="1") as (api, _):
        for stream in (False, True):
            response = api.post("/v1/chat/completions",
                                _chat(model=str(tiny_model), stream=stream, max_tokens=1000), timeout=60)
            assert response.status_code == 400, response.text
            error = error_body(response)
            assert error["code"] == "kv_cache_exceeded" and error["type"] == "invalid_request_error"
            assert error["param"] is None and "KV_CACHE_RESERVED_MEMORY_MB is" in error["message"]
        with pytest.raises(openai.BadRequestError) as err:
            api.client().completions.create(model=str(tiny_model), prompt="The harbour", max_tokens=1000)
        assert err.value.code == "kv_cache_exceeded"
        # What fits the budget is served.
        reply = api.client().completions.create(model=str(tiny_model), prompt="The harbour", max_tokens=4)
        assert reply.usage.completion_tokens == 4


def test_real_ring_restart_mid_stream_loses_nothing(real_ring: tuple[ApiServer, RankProcess],
                                                     tiny_model: Path) -> None:
    """Rank 0 killed after the first tokens: the restarted one resumes the request after the
    tokens already streamed, and the client's stream goes on without repeating anything."""
    api, rank = real_ring
    messages = [{"role": "user", "content": "Write a long story about the harbour."}]
    max_tokens = MAX_SEQ - 40
    expected = mlx_lm_greedy(tiny_model, messages, max_tokens).text
    body = {"model": str(tiny_model), "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    texts: list[str] = []
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as response:
        for event in (json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")):
            texts.append(event["choices"][0]["delta"].get("content") or "")
            if len(texts) == 3:  # role chunk and two pieces of text
                rank.stop(kill=True)
                rank.start()
    request_id = event["id"].removeprefix("chatcmpl-")
    assert "".join(texts) == expected
    kinds = [e.type for e in _events(api, request_id)]
    if "requeued" not in kinds:
        pytest.skip("generation finished before the kill; the restart path did not run")


def test_real_ring_restart_before_a_non_streaming_reply(real_ring: tuple[ApiServer, RankProcess],
                                                        tiny_model: Path) -> None:
    """Rank 0 killed with part of a non-streaming reply generated: the reply holds the text
    before the kill and the resumed generation's, each once."""
    api, rank = real_ring
    messages = [{"role": "user", "content": "Write a long story about the harbour."}]
    max_tokens = MAX_SEQ - 40
    reference = mlx_lm_greedy(tiny_model, messages, max_tokens)
    replies: list = []
    client = api.client(timeout=120)
    thread = threading.Thread(target=lambda: replies.append(client.chat.completions.create(
        model=str(tiny_model), messages=messages, max_tokens=max_tokens, temperature=0)))
    thread.start()
    claimed = api.settings.spool_dir / "claimed"

    def generating() -> bool:
        return any(sum(isinstance(e, Delta) for e in _events(api, path.stem)) >= 2 for path in claimed.iterdir())

    try:
        assert wait_for(generating, timeout=30)
        rank.stop(kill=True)
        rank.start()
    finally:
        thread.join(timeout=120)
    assert replies, "no reply"
    reply = replies[0]
    assert reply.choices[0].message.content == reference.text
    assert reply.usage.completion_tokens == len(reference.token_ids)
    kinds = [e.type for e in _events(api, reply.id.removeprefix("chatcmpl-"))]
    if "requeued" not in kinds:
        pytest.skip("generation finished before the kill; the restart path did not run")


def test_a_seeded_stream_resumed_after_a_kill_is_the_uninterrupted_text(real_ring: tuple[ApiServer, RankProcess],
                                                                        tiny_model: Path) -> None:
    """Sampling draws are fixed by (seed, position), and a resumed request prefills what it
    streamed: killing rank 0 mid-stream changes nothing in the text a seeded request gets."""
    api, rank = real_ring
    body = {"model": str(tiny_model), "messages": LONG_MESSAGES, "max_tokens": 120, "temperature": 0.9,
            "seed": 1234, "stream": True}

    def streamed(kill_after: int | None) -> tuple[str, str]:
        texts: list[str] = []
        with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, headers=AUTH,
                          timeout=120) as response:
            for event in (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")):
                texts.append(event["choices"][0]["delta"].get("content") or "")
                if len(texts) == kill_after:
                    rank.stop(kill=True)
                    rank.start()
        return "".join(texts), event["id"].removeprefix("chatcmpl-")

    uninterrupted, _ = streamed(None)
    resumed, request_id = streamed(kill_after=8)
    if "requeued" not in [e.type for e in _events(api, request_id)]:
        pytest.skip("generation finished before the kill; the restart path did not run")
    assert resumed == uninterrupted


def test_a_request_that_fails_on_rank_0_fails_alone(real_ring: tuple[ApiServer, RankProcess],
                                                     tiny_model: Path) -> None:
    """A request queued past the API's checks (here a top_k mlx-lm's sampler raises on,
    written straight into the spool) is refused by rank 0 before it reaches the ring,
    while a stream under way completes and the ring stays healthy."""
    api, _ = real_ring
    expected = mlx_lm_greedy(tiny_model, LONG_MESSAGES, 60).text
    body = {"model": str(tiny_model), "messages": LONG_MESSAGES, "max_tokens": 60, "temperature": 0, "stream": True}
    texts = []
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                texts.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                if len(texts) == 3:
                    poison = api.spool.submit(SpoolRequest(
                        kind="completion", model=str(tiny_model), prompt_tokens=[5, 6], max_tokens=4,
                        sampling=SamplingParams(top_k=VOCAB_SIZE), created=0))
    assert "".join(texts) == expected
    assert wait_for(lambda: (api.settings.spool_dir / "done" / f"{poison}.json").exists(), timeout=30)
    failed = _events(api, poison)[-1]
    assert failed.type == "error" and failed.code == "invalid_sampling" and failed.status == 400, failed
    assert httpx.get(f"{api.url}/health").status_code == 200
