"""The HTTP front over real HTTP: uvicorn on a free port, httpx and the official openai client.

Most tests need no generation: a `FakeRank` thread plays rank 0 through the real spool
with scripted events. The tests at the end run the real rank 0 (`python server.py`) on a
tiny model and compare its greedy output with single-process mlx-lm.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import mlx_lm
import openai
import pytest
import uvicorn
from mlx_lm.sample_utils import make_sampler

from api import create_app
from config import REPO_DIR, Settings, load_settings
from spool import Spool
from tiny_models import make_tiny_model

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 4096
MAX_SEQ = 256
WORDS = ["Hello", ",", " world", "!"]

Script = Callable[[dict, int], list]  # (request, attempt) -> events, and float pauses


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


class ApiServer:
    """create_app(settings) under a real uvicorn in a thread, on a socket bound here."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(settings), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "API did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    @property
    def spool(self) -> Spool:
        return Spool(self.settings.spool_dir)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kwargs)

    def post(self, path: str, body: dict, timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=AUTH, timeout=timeout)


def _default_script(request: dict, attempt: int) -> list:
    prompt = len(request["prompt_tokens"])
    usage = {"prompt_tokens": prompt, "completion_tokens": len(WORDS), "total_tokens": prompt + len(WORDS)}
    deltas = [{"type": "delta", "text": w, "token_ids": [i]} for i, w in enumerate(WORDS)]
    return [*deltas, {"type": "final", "finish_reason": "stop", "usage": usage, "timings": {}}]


class FakeRank(threading.Thread):
    """Plays rank 0 through the real spool: heartbeats, claims, and scripted events."""

    def __init__(self, root: Path, script: Script = _default_script) -> None:
        super().__init__(daemon=True)
        self.spool, self.script = Spool(root), script
        self.received: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.spool.write_heartbeat({"state": "ready", "active": 1})
            if self.spool.wait_for_work(0.05) and (got := self.spool.claim()) is not None:
                self._play(*got)

    def _play(self, request_id: str, request: dict) -> None:
        self.received.append(request)
        attempt = self.attempts[request_id] = self.attempts.get(request_id, -1) + 1
        for step in self.script(request, attempt):
            if self.spool.is_cancelled(request_id):
                usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                self.spool.finish(request_id, {"type": "final", "finish_reason": "cancelled", "usage": usage})
                return
            if isinstance(step, float):
                time.sleep(step)
            elif step == "crash":
                self.spool.requeue_claimed()  # as a restarted rank 0 does
                return
            elif step["type"] in ("final", "error"):
                self.spool.finish(request_id, step)
            else:
                self.spool.append(request_id, step)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama")


def _settings(model: Path, spool_dir: Path, **overrides) -> Settings:
    values = dict(model_repo=str(model), spool_dir=spool_dir, api_key=KEY, max_request_bytes=MAX_BYTES,
                  max_sequence_length=MAX_SEQ, default_max_tokens=16, request_timeout=5.0,
                  heartbeat_timeout=2.0, ring_down_after=30.0)
    return load_settings(**(values | overrides))


@pytest.fixture(scope="module")
def api_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with ApiServer(_settings(tiny_model, tmp_path_factory.mktemp("spool"))) as server:
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


@pytest.fixture
def rank(api: ApiServer) -> Iterator[FakeRank]:
    fake = FakeRank(api.settings.spool_dir)
    fake.start()
    yield fake
    fake.stop()


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


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


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


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
        assert _error(response)["code"] == "invalid_api_key"
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
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"
    # Without Content-Length (chunked upload) the limit holds as the body arrives.
    data = json.dumps(big).encode()
    chunks = (data[i:i + 1000] for i in range(0, len(data), 1000))
    response = httpx.post(f"{api.url}/v1/chat/completions", content=chunks, headers=AUTH)
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"
    assert not _files(api, "incoming")


@pytest.mark.parametrize(("patch", "param"), [
    ({"n": 2}, "n"),
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
    error = _error(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_invalid_json_and_missing_prompt_are_400(api: ApiServer, model_id: str) -> None:
    response = httpx.post(f"{api.url}/v1/chat/completions", content=b"{oops",
                          headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in _error(response)["message"]
    response = api.post("/v1/completions", {"model": model_id})
    assert response.status_code == 400 and _error(response)["param"] == "prompt"
    response = api.post("/v1/completions", {"model": model_id, "prompt": ""})
    assert response.status_code == 400 and _error(response)["param"] == "prompt"


def test_context_length_exceeded(api: ApiServer, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.client().chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=MAX_SEQ)
    assert err.value.code == "context_length_exceeded"
    assert f"maximum context length is {MAX_SEQ} tokens" in err.value.message
    assert f"{MAX_SEQ} in the completion" in err.value.message
    # A prompt that fills the context on its own fails even with the default max_tokens.
    response = api.post("/v1/completions", {"model": model_id, "prompt": "1 2 3 4 5 6 7 8 9 " * 60})
    assert response.status_code == 400 and _error(response)["code"] == "context_length_exceeded"
    assert not _files(api, "incoming")


def test_ring_down_is_503_and_queues_nothing(api: ApiServer, model_id: str) -> None:
    response = api.post("/v1/chat/completions", _chat(model=model_id))
    assert response.status_code == 503 and "no heartbeat" in _error(response)["message"]
    api.spool.write_heartbeat({"state": "ready", "time": time.time() - 60})  # older than RING_DOWN_AFTER
    response = api.post("/v1/chat/completions", _chat(model=model_id, stream=True))
    assert response.status_code == 503 and "60" in _error(response)["message"]
    assert _error(response)["type"] == "server_error"
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
                                              "ranks": 2, "active": 0, "time": 0}
    api.spool.write_heartbeat({"state": "ready", "time": time.time() - 5})  # > HEARTBEAT_TIMEOUT
    response = httpx.get(f"{api.url}/health")
    assert response.status_code == 503 and "ago" in response.json()["reason"]


def test_timeout_is_504_and_cancels(tiny_model: Path, tmp_path: Path) -> None:
    with ApiServer(_settings(tiny_model, tmp_path / "spool", request_timeout=0.5)) as api:
        api.spool.write_heartbeat({"state": "ready"})  # alive, but nobody claims
        for stream in (False, True):
            started = time.monotonic()
            response = api.post("/v1/chat/completions", _chat(model=str(tiny_model), stream=stream))
            assert response.status_code == 504 and _error(response)["code"] == "timeout"
            assert 0.5 <= time.monotonic() - started < 3
        assert len(_files(api, "cancel")) == 2
        assert api.spool.queue_depth() == 0  # withdrawn, so a ring coming back skips them


def test_client_disconnect_while_queued_cancels(api: ApiServer, model_id: str) -> None:
    api.spool.write_heartbeat({"state": "ready"})
    for stream in (False, True):
        with pytest.raises(httpx.ReadTimeout):
            api.post("/v1/chat/completions", _chat(model=model_id, stream=stream), timeout=0.3)
    assert _wait_for(lambda: len(_files(api, "cancel")) == 2, timeout=3)
    assert api.spool.queue_depth() == 0


def test_client_disconnect_mid_stream_cancels(api: ApiServer, model_id: str) -> None:
    def slow(request: dict, attempt: int) -> list:
        return [{"type": "delta", "text": "x", "token_ids": [1]}, *[0.05, {"type": "delta", "text": "y",
                                                                           "token_ids": [2]}] * 200]

    fake = FakeRank(api.settings.spool_dir, slow)
    fake.start()
    try:
        stream = api.client().chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        assert _wait_for(lambda: len(_files(api, "cancel")) == 1, timeout=3)
        assert _wait_for(lambda: len(_files(api, "done")) == 1, timeout=3)  # the rank stopped it
    finally:
        fake.stop()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_text(api: ApiServer, rank: FakeRank, model_id: str) -> None:
    before = httpx.get(f"{api.url}/metrics").text
    api.client().chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(f"{api.url}/metrics").text
    for name in ("mlx_ring_http_requests_total", "mlx_ring_prompt_tokens_total",
                 "mlx_ring_completion_tokens_total", "mlx_ring_time_to_first_token_seconds_bucket",
                 "mlx_ring_inter_token_latency_seconds_bucket", "mlx_ring_queue_depth",
                 "mlx_ring_active_sequences"):
        assert name in text, name
    assert 'mlx_ring_http_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert _metric(text, "mlx_ring_active_sequences") == 1  # from the fake rank's heartbeat
    assert _metric(text, "mlx_ring_queue_depth") == 0
    for name, grew in (("mlx_ring_completion_tokens_total", len(WORDS)),
                       ("mlx_ring_time_to_first_token_seconds_count", 1),
                       ("mlx_ring_inter_token_latency_seconds_count", len(WORDS) - 1)):
        assert _metric(text, name) - _metric(before, name) == grew, name


# ---------------------------------------------------------------------------
# Against a scripted rank 0
# ---------------------------------------------------------------------------


def test_chat_non_streaming(api: ApiServer, rank: FakeRank, model_id: str, tiny_model: Path) -> None:
    reply = api.client().chat.completions.create(
        model=model_id, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0, seed=7, stop="\n", max_completion_tokens=8)
    assert reply.object == "chat.completion" and reply.model == model_id
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "".join(WORDS)
    assert reply.choices[0].finish_reason == "stop"
    tokenizer = mlx_lm.utils.load_tokenizer(tiny_model)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(WORDS)
    sent = rank.received[-1]
    assert sent == {"kind": "chat", "model": model_id, "prompt_tokens": list(prompt), "max_tokens": 8,
                    "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": None,
                    "seed": 7, "stop": ["\n"], "created": sent["created"]}


def test_chat_streaming_with_usage(api: ApiServer, rank: FakeRank, model_id: str) -> None:
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", headers=AUTH, timeout=30,
                      json=_chat(model=model_id, stream=True, stream_options={"include_usage": True})) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]] == WORDS
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(WORDS)
    assert rank.received[-1]["max_tokens"] == 16  # DEFAULT_MAX_TOKENS


def test_openai_client_streaming(api: ApiServer, rank: FakeRank, model_id: str) -> None:
    stream = api.client().chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(WORDS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_completions(api: ApiServer, rank: FakeRank, model_id: str, tiny_model: Path) -> None:
    client = api.client()
    reply = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=5)
    assert reply.object == "text_completion" and reply.choices[0].text == "".join(WORDS)
    tokenizer = mlx_lm.utils.load_tokenizer(tiny_model)
    assert rank.received[-1]["prompt_tokens"] == tokenizer.encode("Once upon a time")
    assert rank.received[-1]["kind"] == "completion" and rank.received[-1]["max_tokens"] == 5
    chunks = list(client.completions.create(model=model_id, prompt="Once upon a time", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(WORDS)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def _requeue_script(request: dict, attempt: int) -> list:
    """Rank 0 dies after two deltas; the restarted one generates the same text again."""
    if attempt == 0:
        return [{"type": "delta", "text": "Hel", "token_ids": [1]}, {"type": "delta", "text": "lo", "token_ids": [2]},
                "crash"]
    return _default_script(request, attempt)


def test_requeued_request_restarts_output(api: ApiServer, model_id: str) -> None:
    fake = FakeRank(api.settings.spool_dir, _requeue_script)
    fake.start()
    try:
        client = api.client()
        reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hello, world!"
        chunks = list(client.chat.completions.create(model=model_id, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert "".join(texts) == "Hello, world!"
        assert texts[:2] == ["Hel", "lo"]  # sent before the crash, not repeated after it
        assert fake.attempts and set(fake.attempts.values()) == {1}
    finally:
        fake.stop()


def _error_script(status: int, after_text: bool) -> Script:
    error = {"type": "error", "message": "the rank refused", "code": "refused", "status": status}
    text = [{"type": "delta", "text": "partial", "token_ids": [1]}] if after_text else []
    return lambda request, attempt: [*text, error]


def test_readers_poll_without_inotify(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Spool, "watch_streams", lambda self: None)
    with ApiServer(_settings(tiny_model, tmp_path / "spool")) as api:
        fake = FakeRank(api.settings.spool_dir)
        fake.start()
        try:
            chunks = list(api.client().chat.completions.create(
                model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(WORDS)
        finally:
            fake.stop()


def test_rank_error_before_output_keeps_its_status(api: ApiServer, model_id: str) -> None:
    fake = FakeRank(api.settings.spool_dir, _error_script(422, after_text=False))
    fake.start()
    try:
        for stream in (False, True):
            response = api.post("/v1/chat/completions", _chat(model=model_id, stream=stream))
            assert response.status_code == 422
            assert _error(response) == {"message": "the rank refused", "type": "invalid_request_error",
                                        "param": None, "code": "refused"}
    finally:
        fake.stop()


def test_rank_error_mid_stream_is_an_sse_error(api: ApiServer, model_id: str) -> None:
    fake = FakeRank(api.settings.spool_dir, _error_script(500, after_text=True))
    fake.start()
    try:
        stream = api.client().chat.completions.create(model=model_id, stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.APIError, match="the rank refused"):
            list(stream)
    finally:
        fake.stop()


# ---------------------------------------------------------------------------
# Against the real rank 0: server.py in serve mode
# ---------------------------------------------------------------------------

SERVER = REPO_DIR / "server.py"


def _serve_mode_exists() -> bool:
    return SERVER.exists() and "Spool" in SERVER.read_text()


class RankProcess:
    """`python server.py` as one rank 0 in serve mode; can be killed and started again."""

    def __init__(self, model: Path, spool_dir: Path) -> None:
        self.spool = Spool(spool_dir)
        self.log_path = spool_dir.parent / "server.log"
        self.env = os.environ | {"MODEL_REPO": str(model), "SPOOL_DIR": str(spool_dir),
                                 "MAX_SEQUENCE_LENGTH": str(MAX_SEQ),
                                 "MLX_RING_ENV_FILE": str(spool_dir.parent / "no.env")}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait for a heartbeat saying ready written by this run."""
        started = time.time()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(SERVER)], cwd=REPO_DIR, env=self.env,
                                         stdout=log, stderr=log)

        def ready() -> bool:
            beat = self.spool.read_heartbeat() or {}
            return (beat.get("state") == "ready" and beat["time"] >= started) or self.proc.poll() is not None

        assert _wait_for(ready, timeout=180) and self.proc.poll() is None, \
            f"server.py did not get ready:\n{self.log_path.read_text()[-3000:]}"

    def stop(self, kill: bool = False) -> None:
        self.proc.kill() if kill else self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def real_ring(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, RankProcess]]:
    """`python server.py` (one rank) and the API on one spool, both on the tiny model."""
    if not _serve_mode_exists():
        pytest.skip("server.py has no serve mode yet")
    spool_dir = tmp_path_factory.mktemp("ring") / "spool"
    rank = RankProcess(tiny_model, spool_dir)
    with ApiServer(_settings(tiny_model, spool_dir, request_timeout=120.0)) as api:
        rank.start()
        try:
            yield api, rank
        finally:
            rank.stop()


def _mlx_lm_greedy(model_dir: Path, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    """Text and finish reason of greedy decoding in one process with plain mlx-lm."""
    model, tokenizer = mlx_lm.load(str(model_dir))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text, finish = "", None
    for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                           sampler=make_sampler(0.0)):
        text += response.text
        finish = response.finish_reason
    return text, finish


def test_real_ring_greedy_matches_mlx_lm(real_ring: tuple[ApiServer, RankProcess], tiny_model: Path) -> None:
    api, _ = real_ring
    messages = [{"role": "user", "content": "Tell me about the harbour town of Wexley."}]
    expected, finish = _mlx_lm_greedy(tiny_model, messages, max_tokens=12)
    client = api.client()
    model = str(tiny_model)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == finish
    assert reply.usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_real_ring_completion_and_health(real_ring: tuple[ApiServer, RankProcess], tiny_model: Path) -> None:
    api, _ = real_ring
    reply = api.client().completions.create(model=str(tiny_model), prompt="The harbour", max_tokens=5,
                                            temperature=0)
    assert reply.usage.completion_tokens <= 5 and reply.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{api.url}/health").json()["status"] == "ok"


def test_real_ring_restart_mid_stream_loses_nothing(real_ring: tuple[ApiServer, RankProcess],
                                                     tiny_model: Path) -> None:
    """Rank 0 killed after the first tokens: the restarted one requeues and regenerates the
    request, and the client's stream goes on without repeating anything."""
    api, rank = real_ring
    messages = [{"role": "user", "content": "Write a long story about the harbour."}]
    max_tokens = MAX_SEQ - 40
    expected, _ = _mlx_lm_greedy(tiny_model, messages, max_tokens)
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
    kinds = [e["type"] for e in api.spool.read_events(request_id)[0]]
    if "requeued" not in kinds:
        pytest.skip("generation finished before the kill; the restart path did not run")
