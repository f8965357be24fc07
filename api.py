"""OpenAI-compatible HTTP front: checks and tokenizes requests, queues them in the spool,
and turns rank 0's events back into OpenAI responses (plain JSON or server-sent events).

`python api.py` serves on API_HOST:API_PORT. The front never talks to the ranks directly,
so it stays up, and keeps accepting requests, while the ring restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import jinja2
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from mlx_lm.utils import load_tokenizer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import Settings, load_settings, settings_or_exit
from models import resolve_model, served_name
from spool import Spool

log = logging.getLogger("api")

EVENT_POLL = 0.001  # s between looks at a stream file without inotify: it adds to every token's latency
# s between re-reads of a stream file inotify said nothing about: only a safety net (an
# overflowed event queue), and every waiting request pays for each look.
INOTIFY_RECHECK = 1.0
DISCONNECT_CHECK = 0.1  # s between checks that a waiting client is still there
# s a stopping API lets its requests finish; then uvicorn cancels them, which cancels them in
# the spool too (their clients are cut off). Well under launch.sh's KILL_GRACE, so that an
# open stream never gets the API SIGKILLed before it has cleaned up.
SHUTDOWN_GRACE = 2.0
MAX_STOP_STRINGS = 16
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# ---------------------------------------------------------------------------
# Errors: always OpenAI's envelope
# ---------------------------------------------------------------------------


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(HTTPException):
    """An error answered in OpenAI's envelope. FastAPI's HTTPException so that raising it
    while the body is read (the size limit) is not turned into a generic 400."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(status, message)
        kind = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.detail_model = ErrorDetail(message=message, type=kind, param=param, code=code)


def _error_json(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return _error_json(exc.status_code, exc.detail_model)
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return _error_json(exc.status_code, ErrorDetail(message=str(exc.detail), type=kind))


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    fields = []
    for part in first.get("loc", ())[1:]:  # [0] is "body"
        # Inside a union pydantic names the member type ("str", "list[TextPart]"): the field ends.
        if str(part) in _TYPE_TAGS or "[" in str(part):
            break
        fields.append(str(part))
    param = ".".join(fields) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
    return _error_json(400, ErrorDetail(message=message, type="invalid_request_error", param=param,
                                        code="invalid_value"))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises it afterwards, so uvicorn logs the traceback.
    return _error_json(500, ErrorDetail(message="internal server error", type="server_error"))


def _event_error(event: dict) -> APIError:
    """An `error` event from rank 0 as an HTTP error."""
    status = int(event.get("status") or 500)
    return APIError(status, str(event.get("message", "generation failed")), code=event.get("code"))


# ---------------------------------------------------------------------------
# Request models
# ---------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by chat and text completions. None means "the default" throughout,
    since some clients send explicit nulls."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str


# ---------------------------------------------------------------------------
# Response models
# ---------------------------------------------------------------------------


def _is_none(value: Any) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A text completion, and also each chunk of a streamed one (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlx-ring"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """`status` and `reason`, plus whatever rank 0 put in its heartbeat."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "unavailable"]
    reason: str | None = None
    queue_depth: int


# ---------------------------------------------------------------------------
# Reply builders: the OpenAI objects of one request, chat or text completion
# ---------------------------------------------------------------------------


class ChatReply:
    def __init__(self, request_id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{request_id}", created, model

    def _chunk(self, delta: ChunkDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def opening(self) -> BaseModel | None:
        return self._chunk(ChunkDelta(role="assistant", content=""))

    def delta(self, text: str) -> BaseModel:
        return self._chunk(ChunkDelta(content=text))

    def closing(self, finish_reason: str) -> BaseModel:
        return self._chunk(ChunkDelta(), finish_reason)

    def usage(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)


class CompletionReply:
    def __init__(self, request_id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = f"cmpl-{request_id}", created, model

    def _make(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self) -> BaseModel | None:
        return None

    def delta(self, text: str) -> BaseModel:
        return self._make([CompletionChoice(text=text)])

    def closing(self, finish_reason: str) -> BaseModel:
        return self._make([CompletionChoice(text="", finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> BaseModel:
        return self._make([], usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return self._make([CompletionChoice(text=text, finish_reason=finish_reason)], usage)


Reply = ChatReply | CompletionReply


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


class Metrics:
    """The front's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlx_ring_http_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("mlx_ring_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("mlx_ring_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("mlx_ring_time_to_first_token_seconds", "From request queued to first text",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mlx_ring_inter_token_latency_seconds", "Between successive text events",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("mlx_ring_queue_depth", "Requests waiting in the spool", registry=r)
        self.active = Gauge("mlx_ring_active_sequences", "Sequences rank 0 is generating", registry=r)
        self.prompt_cache_hits = Counter("mlx_ring_prompt_cache_hits", "Requests that reused cached prompt KV",
                                         registry=r)
        self.prompt_cache_misses = Counter("mlx_ring_prompt_cache_misses", "Requests that reused no cached KV",
                                           registry=r)
        self.prompt_cache_reused = Counter("mlx_ring_prompt_cache_reused_tokens",
                                           "Prompt tokens taken from the prompt cache", registry=r)
        self.prompt_cache_tokens = Gauge("mlx_ring_prompt_cache_tokens", "Tokens held in rank 0's prompt cache",
                                         registry=r)


# ---------------------------------------------------------------------------
# Front door: API key and body size, before anything parses the body
# ---------------------------------------------------------------------------

_KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


class FrontDoor:
    """Pure ASGI middleware (no buffering of streamed responses): checks the API key on /v1/,
    limits the body size, and counts responses by status."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.api_key, self.max_bytes, self.metrics = app, api_key, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await _error_json(refusal.status_code, refusal.detail_model)(scope, receive, counting_send)
        await self.app(scope, self._limited(receive), counting_send)

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), self.api_key.encode()):
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return _too_large(self.max_bytes)
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that fails once a body without Content-Length grows too large."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _too_large(self.max_bytes)
            return message

        return wrapped


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")


# ---------------------------------------------------------------------------
# Following a request's events in the spool
# ---------------------------------------------------------------------------


class StreamWaker:
    """Wakes the readers of requests whose stream file changed. With inotify a reader sleeps
    until rank 0 writes, re-reading every `recheck` s all the same in case a change went
    unreported (an overflowed queue, a network file system); without it readers poll."""

    def __init__(self, spool: Spool, recheck: float) -> None:
        self._watch = spool.watch_streams()
        self._waiting: dict[str, asyncio.Event] = {}
        self._recheck = EVENT_POLL if self._watch is None else recheck
        if self._watch is not None:
            asyncio.get_running_loop().add_reader(self._watch.fileno(), self._wake)

    def _wake(self) -> None:
        for request_id in self._watch.changed():
            if (event := self._waiting.get(request_id)) is not None:
                event.set()

    def register(self, request_id: str) -> None:
        """Start tracking a request; before its first read, so no write goes unnoticed."""
        self._waiting[request_id] = asyncio.Event()

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    async def wait(self, request_id: str, timeout: float) -> None:
        """Until the request's stream changes, or at most `timeout` s."""
        event = self._waiting[request_id]
        try:
            async with asyncio.timeout(min(timeout, self._recheck)):
                await event.wait()
        except TimeoutError:
            pass
        event.clear()

    def close(self) -> None:
        if self._watch is not None:
            asyncio.get_running_loop().remove_reader(self._watch.fileno())


class EventFeed:
    """The events rank 0 writes for one request, read as they appear."""

    def __init__(self, spool: Spool, waker: StreamWaker, request_id: str, timeout: float,
                 metrics: Metrics) -> None:
        self.spool, self.waker, self.request_id, self.metrics = spool, waker, request_id, metrics
        waker.register(request_id)
        self.queued_at = time.monotonic()
        self._deadline = self.queued_at + timeout
        self._offset = 0
        self._pending: deque[dict] = deque()
        self._last_text: float | None = None
        self.finished = False

    async def next(self, client: Request | None) -> dict | None:
        """The next event. None if `client` (when given) disconnected; 504 on timeout."""
        next_check = time.monotonic() + DISCONNECT_CHECK
        while not self._pending:
            events, self._offset = self.spool.read_events(self.request_id, self._offset)
            if events:
                self._pending.extend(events)
                break
            now = time.monotonic()
            if now >= self._deadline:
                log.warning("request %s timed out after %.0f s", self.request_id, now - self.queued_at)
                raise APIError(504, "no result from the ring within REQUEST_TIMEOUT", code="timeout")
            wake_at = self._deadline
            if client is not None:
                if now >= next_check:
                    if await client.is_disconnected():
                        return None
                    next_check = now + DISCONNECT_CHECK
                wake_at = min(wake_at, next_check)
            await self.waker.wait(self.request_id, wake_at - now)
        event = self._pending.popleft()
        self._observe(event)
        return event

    def _observe(self, event: dict) -> None:
        kind, now = event.get("type"), time.monotonic()
        if kind == "delta":
            if self._last_text is None:
                self.metrics.ttft.observe(now - self.queued_at)
            else:
                self.metrics.itl.observe(now - self._last_text)
            self._last_text = now
        elif kind == "requeued":
            log.info("request %s requeued: the ring restarted, output starts over", self.request_id)
        elif kind == "error":
            log.warning("request %s failed: %s", self.request_id, event.get("message"))
            self.finished = True
        elif kind == "final":
            self.finished = True

    def close(self, why: str) -> None:
        """Stop following; cancel the request in the spool unless it finished."""
        self.waker.forget(self.request_id)
        if not self.finished:
            self.finished = True
            self.spool.cancel(self.request_id)
            log.info("request %s cancelled: %s", self.request_id, why)


class FreshText:
    """Text of a stream not sent yet: after a `requeued` event the output starts over, and
    (generation being deterministic for greedy or seeded sampling) its first part was sent."""

    def __init__(self) -> None:
        self.sent = 0  # characters sent to the client
        self.produced = 0  # characters produced since the last restart

    def restart(self) -> None:
        self.produced = 0

    def take(self, text: str) -> str:
        start = max(self.sent - self.produced, 0)
        self.produced += len(text)
        fresh = text[start:]
        self.sent += len(fresh)
        return fresh


def _usage(final: dict) -> Usage:
    return Usage.model_validate(final["usage"])


def _finished(feed: EventFeed, final: dict, metrics: Metrics) -> Usage:
    usage = _usage(final)
    metrics.prompt_tokens.inc(usage.prompt_tokens)
    metrics.completion_tokens.inc(usage.completion_tokens)
    cached = usage.prompt_tokens_details.cached_tokens
    (metrics.prompt_cache_hits if cached else metrics.prompt_cache_misses).inc()
    metrics.prompt_cache_reused.inc(cached)
    log.info("request %s finished: %s, %d+%d tokens in %.3f s", feed.request_id, final.get("finish_reason"),
             usage.prompt_tokens, usage.completion_tokens, time.monotonic() - feed.queued_at)
    return usage


async def _collect(feed: EventFeed, client: Request, reply: Reply, metrics: Metrics) -> BaseModel:
    """Wait for the whole result of a non-streaming request."""
    parts: list[str] = []
    try:
        while (event := await feed.next(client)) is not None:
            kind = event["type"]
            if kind == "delta":
                parts.append(event["text"])
            elif kind == "requeued":
                parts.clear()
            elif kind == "error":
                raise _event_error(event)
            elif kind == "final":
                return reply.whole("".join(parts), event["finish_reason"], _finished(feed, event, metrics))
        raise APIError(499, "client closed the connection", code="client_closed")
    finally:
        feed.close("client gone or timed out")


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


async def _first_event(feed: EventFeed, client: Request) -> dict:
    """Wait until rank 0 starts the request (or ends it) before answering a streaming
    request, so that a refusal or a timeout in the queue still gets its proper HTTP
    status, while the headers and the opening chunk go out during the prefill."""
    try:
        while (event := await feed.next(client)) is not None:
            if event["type"] == "error":
                raise _event_error(event)
            if event["type"] != "requeued":
                return event
        raise APIError(499, "client closed the connection", code="client_closed")
    except BaseException:
        feed.close("client gone or timed out before any output")
        raise


async def _stream(feed: EventFeed, first: dict, reply: Reply, include_usage: bool,
                  metrics: Metrics) -> AsyncIterator[str]:
    """The server-sent events of a streaming request, from its first event on (usually
    `started`, when the opening chunk goes out). Events ready together go out in one
    write (the closing chunk with the usage and [DONE]), so a client gets them in one read."""
    fresh = FreshText()
    ready: list[str] = []
    try:
        opening = reply.opening()
        if opening is not None:
            ready.append(_sse(opening))
        event = first
        while True:
            kind = event["type"]
            if kind == "delta" and (text := fresh.take(event["text"])):
                ready.append(_sse(reply.delta(text)))
            elif kind == "requeued":
                fresh.restart()
            elif kind == "error":
                ready.append(_sse(ErrorResponse(error=_event_error(event).detail_model)))
                yield "".join(ready)
                return
            elif kind == "final":
                usage = _finished(feed, event, metrics)
                ready.append(_sse(reply.closing(event["finish_reason"])))
                if include_usage:
                    ready.append(_sse(reply.usage(usage)))
                ready.append("data: [DONE]\n\n")
                yield "".join(ready)
                return
            if ready:
                yield "".join(ready)
                ready.clear()
            # Starlette watches for the disconnect itself while it streams, so no client here.
            event = await feed.next(None)
    except APIError as err:  # raised by feed.next, so nothing is left in `ready`
        yield _sse(ErrorResponse(error=err.detail_model))
    finally:
        feed.close("client disconnected or timed out mid-stream")


# ---------------------------------------------------------------------------
# Turning a request into a spool request
# ---------------------------------------------------------------------------


def _chat_tokens(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except jinja2.TemplateError as err:
        raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None


def _max_tokens(body: GenerationRequest, prompt_tokens: int, settings: Settings, param: str) -> int:
    """Completion budget: as requested (refused if it cannot fit), else the default cut to
    what fits the context."""
    limit = settings.max_sequence_length
    requested = body.requested_max_tokens()
    max_tokens = requested if requested is not None else min(settings.default_max_tokens, limit - prompt_tokens)
    if max_tokens < 1 or prompt_tokens + max_tokens > limit:
        wanted = max(max_tokens, 1)
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the {param}, {wanted} in the "
            f"completion). Please reduce the length of the {param} or completion.",
            param=param, code="context_length_exceeded")
    return max_tokens


def _spool_request(body: GenerationRequest, kind: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    return {
        "kind": kind,
        "model": model,
        "prompt_tokens": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": body.top_k or 0,
        "min_p": body.min_p or 0.0,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
        "stop": body.stop,
        "created": int(time.time()),
    }


def _heartbeat_problem(beat: dict | None, max_age: float) -> str | None:
    """Why the heartbeat says the ring is not there, or None."""
    if beat is None or not isinstance(beat.get("time"), (int, float)):
        return "no heartbeat from rank 0"
    age = time.time() - beat["time"]
    if age > max_age:
        return f"last heartbeat from rank 0 was {age:.1f} s ago"
    return None


async def _generate(request: Request, body: GenerationRequest, kind: str, prompt: list[int]) -> Any:
    """Queue a checked request and answer it, streaming or not."""
    state = request.app.state
    settings: Settings = state.settings
    param = "messages" if kind == "chat" else "prompt"
    if not prompt:
        raise APIError(400, "the prompt is empty", param=param)
    max_tokens = _max_tokens(body, len(prompt), settings, param)
    problem = _heartbeat_problem(state.spool.read_heartbeat(), settings.ring_down_after)
    if problem is not None:
        raise APIError(503, f"the ring is down ({problem}); nothing was queued", code="ring_unavailable")
    spool_request = _spool_request(body, kind, state.model_id, prompt, max_tokens)
    # The submit fsyncs: off the event loop, so other requests' tokens keep flowing meanwhile.
    request_id = await asyncio.to_thread(state.spool.submit, spool_request)
    log.info("request %s queued: %s, %d prompt tokens, max_tokens %d, stream %s", request_id, kind,
             len(prompt), max_tokens, bool(body.stream))
    feed = EventFeed(state.spool, state.waker, request_id, settings.request_timeout, state.metrics)
    reply_type = ChatReply if kind == "chat" else CompletionReply
    reply = reply_type(request_id, spool_request["created"], state.model_id)
    if not body.stream:
        return await _collect(feed, request, reply, state.metrics)
    first = await _first_event(feed, request)
    events = _stream(feed, first, reply, body.include_usage(), state.metrics)
    # The background task also covers a client gone before the stream even started.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(feed.close, "client disconnected mid-stream"))


def _check_model(request: Request, model: str) -> None:
    served = request.app.state.model_id
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


# ---------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503, 504)}
_STREAM = {"text/event-stream": {}}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the tokenizer and open the spool."""
    settings: Settings = app.state.settings
    model_path = resolve_model(settings.model_repo, settings.model_cache_dir)
    app.state.tokenizer = load_tokenizer(Path(model_path))
    app.state.model_id = served_name(settings.model_repo)
    app.state.spool = Spool(settings.spool_dir)
    app.state.waker = StreamWaker(app.state.spool, recheck=INOTIFY_RECHECK)
    app.state.started = int(time.time())
    log.info("serving model %s (tokenizer from %s), spool %s", app.state.model_id, model_path, settings.spool_dir)
    yield
    app.state.waker.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The HTTP front for `settings` (default: read from the environment)."""
    settings = settings or load_settings()
    metrics = Metrics()
    app = FastAPI(title="mlx-ring", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(FrontDoor, api_key=settings.api_key, max_bytes=settings.max_request_bytes,
                       metrics=metrics)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={**_ERRORS, 200: {"content": _STREAM}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check_model(request, body.model)
        return await _generate(request, body, "chat", _chat_tokens(request.app.state.tokenizer, body))

    @app.post("/v1/completions", response_model=Completion, responses={**_ERRORS, 200: {"content": _STREAM}})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(request, body.model)
        return await _generate(request, body, "completion", request.app.state.tokenizer.encode(body.prompt))

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=[ModelCard(id=request.app.state.model_id, created=request.app.state.started)])

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health(request: Request) -> Any:
        spool: Spool = request.app.state.spool
        beat = spool.read_heartbeat()
        problem = _heartbeat_problem(beat, settings.heartbeat_timeout)
        if problem is None and beat.get("state") != "ready":
            problem = f"ring state is {beat.get('state')!r}"
            problem += f": {beat['reason']}" if beat.get("reason") else ""
        info = {**(beat or {}), "status": "unavailable" if problem else "ok", "reason": problem,
                "queue_depth": spool.queue_depth()}
        return JSONResponse(Health.model_validate(info).model_dump(), status_code=503 if problem else 200)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        spool: Spool = request.app.state.spool
        beat = spool.read_heartbeat()
        fresh = _heartbeat_problem(beat, settings.heartbeat_timeout) is None
        metrics.queue_depth.set(spool.queue_depth())
        metrics.active.set(beat.get("active", 0) if fresh else 0)
        metrics.prompt_cache_tokens.set((beat.get("prompt_cache_tokens") or 0) if fresh else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main() -> int:
    settings = settings_or_exit()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s api %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=SHUTDOWN_GRACE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
