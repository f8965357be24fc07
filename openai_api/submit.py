"""Turning a checked request into spool work, and answering it, streaming or not."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from config import Settings
from openai_api.errors import APIError
from openai_api.events import EventFeed, heartbeat_problem
from openai_api.replies import ChatReply, CompletionReply
from openai_api.schemas import ChatCompletionRequest, GenerationRequest
from openai_api.streaming import collect, first_event, stream
from spool.protocol import SpoolRequest

log = logging.getLogger(__name__)


def chat_tokens(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except jinja2.TemplateError as err:
        raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None


def max_tokens(body: GenerationRequest, prompt_tokens: int, settings: Settings, param: str) -> int:
    """Completion budget: as requested (refused if it cannot fit), else the default cut to
    what fits the context."""
    limit = settings.max_sequence_length
    requested = body.requested_max_tokens()
    budget = requested if requested is not None else min(settings.default_max_tokens, limit - prompt_tokens)
    if budget < 1 or prompt_tokens + budget > limit:
        wanted = max(budget, 1)
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the {param}, {wanted} in the "
            f"completion). Please reduce the length of the {param} or completion.",
            param=param, code="context_length_exceeded")
    return budget


async def generate(request: Request, body: GenerationRequest, prompt: list[int]) -> Any:
    """Queue a checked request and answer it, streaming or not."""
    state = request.app.state
    settings: Settings = state.settings
    chat = isinstance(body, ChatCompletionRequest)
    param = "messages" if chat else "prompt"
    if not prompt:
        raise APIError(400, "the prompt is empty", param=param)
    budget = max_tokens(body, len(prompt), settings, param)
    if body.top_k is not None and body.top_k >= state.vocab_size:
        # mlx-lm's sampler raises on it inside rank 0's step, where it would end the ring.
        raise APIError(400, f"top_k must be below the model's vocabulary size ({state.vocab_size}); "
                       "0 turns it off", param="top_k", code="invalid_value")
    problem = heartbeat_problem(state.spool.read_heartbeat(), settings.ring_down_after)
    if problem is not None:
        raise APIError(503, f"the ring is down ({problem}); nothing was queued", code="ring_unavailable")
    work = SpoolRequest(kind="chat" if chat else "completion", model=state.model_id, prompt_tokens=prompt,
                        max_tokens=budget, sampling=body.sampling(), stop=body.stop, created=int(time.time()))
    # The submit fsyncs: off the event loop, so other requests' tokens keep flowing meanwhile.
    request_id = await asyncio.to_thread(state.spool.submit, work)
    log.info("request %s queued: %s, %d prompt tokens, max_tokens %d, stream %s", request_id, work.kind,
             len(prompt), budget, bool(body.stream))
    feed = EventFeed(state.spool, state.waker, request_id, state.metrics, request, settings.request_timeout,
                     settings.ring_down_after)
    reply = (ChatReply if chat else CompletionReply)(request_id, work.created, state.model_id)
    if not body.stream:
        return await collect(feed, reply)
    events = feed.events()
    first = await first_event(feed, events)
    chunks = stream(feed, events, first, reply, body.include_usage())
    # The background task also covers a client gone before the stream even started.
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(feed.close, "client disconnected mid-stream"))
