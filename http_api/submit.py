"""Turning a checked request into spool work, and answering it, streaming or not."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import jinja2
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from config import Settings
from http_api.errors import APIError
from http_api.events import EventFeed, ring_problem
from http_api.logprobs import LogprobText
from http_api.replies import ChatReply, CompletionReply
from http_api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from http_api.streaming import Reply, collect, first_event, stream
from http_api.tools import ToolCallText, check_tools, tool_grammar
from spool.protocol import SamplingParams, SpoolRequest

log = logging.getLogger(__name__)


def chat_tokens(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The conversation (and the tools) through the model's chat template, ready for the
    assistant's turn."""
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
    except jinja2.TemplateError as err:
        raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None


def max_tokens(requested: int | None, prompt_tokens: int, settings: Settings, param: str) -> int:
    """Completion budget: as requested (refused if it cannot fit), else the default cut to
    what fits the context."""
    limit = settings.max_sequence_length
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


def check_vocabulary(sampling: SamplingParams, vocab_size: int) -> None:
    """Token-valued fields against the model's vocabulary: mlx-lm raises on them inside rank
    0's step, where they would end the ring."""
    if sampling.top_k >= vocab_size:
        raise APIError(400, f"top_k must be below the model's vocabulary size ({vocab_size}); 0 turns it off",
                       param="top_k", code="invalid_value")
    if sampling.logit_bias and not all(0 <= token < vocab_size for token in sampling.logit_bias):
        raise APIError(400, f"logit_bias keys must be token ids below the vocabulary size ({vocab_size})",
                       param="logit_bias", code="invalid_value")


@dataclass(frozen=True)
class Work:
    """A request reduced to what the ring needs, whichever API it came in by."""

    kind: Literal["chat", "completion"]
    prompt: list[int]
    requested_max_tokens: int | None
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    param: str  # the request field that holds the prompt, named in errors
    grammar: str | None = None  # what the output must follow (structured outputs, tool calls)
    logprobs: int | None = None  # log-probabilities wanted, with this many top alternatives


ReplyFor = Callable[[str, int], Reply]  # (request id, created) -> the answer's builder


def spool_request(state: Any, work: Work) -> SpoolRequest:
    """Checked work as the spool's request: budget, token-valued fields, and a seed drawn
    for a sampled request without one. APIError (400) if the work cannot run."""
    if not work.prompt:
        raise APIError(400, "the prompt is empty", param=work.param)
    budget = max_tokens(work.requested_max_tokens, len(work.prompt), state.settings, work.param)
    check_vocabulary(work.sampling, state.model.vocab_size)
    sampling = work.sampling
    if sampling.seed is None and sampling.temperature > 0:
        # Kept in the spool, so a request resumed after a ring restart draws as it would have.
        sampling = sampling.model_copy(update={"seed": secrets.randbits(63)})
    return SpoolRequest(kind=work.kind, model=state.model.id, prompt_tokens=work.prompt, max_tokens=budget,
                        sampling=sampling, stop=work.stop, grammar=work.grammar, logprobs=work.logprobs,
                        created=int(time.time()))


async def answer(request: Request, work: Work, reply_for: ReplyFor) -> Any:
    """Queue checked work and answer it, streaming or not."""
    state = request.app.state
    settings: Settings = state.settings
    queued = spool_request(state, work)
    problem = ring_problem(state.spool, settings.ring_down_after)
    if problem is not None:
        raise APIError(503, f"the ring is down ({problem}); nothing was queued", code="ring_unavailable")
    # The submit fsyncs: off the event loop, so other requests' tokens keep flowing meanwhile.
    request_id = await asyncio.to_thread(state.spool.submit, queued)
    log.info("request %s queued: %s, %d prompt tokens, max_tokens %d, stream %s", request_id, work.kind,
             len(work.prompt), queued.max_tokens, work.stream)
    feed = EventFeed(state.spool, state.waker, request_id, state.metrics, request, settings.request_timeout,
                     settings.ring_down_after)
    reply = reply_for(request_id, queued.created)
    if not work.stream:
        return await collect(feed, reply)
    events = feed.events()
    first = await first_event(feed, events)
    # The background task also covers a client gone before the stream even started.
    return StreamingResponse(stream(feed, events, first, reply), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(feed.close, "client disconnected mid-stream"))


def openai_work(body: GenerationRequest, prompt: list[int], defaults: SamplingParams) -> Work:
    chat = isinstance(body, ChatCompletionRequest)
    return Work("chat" if chat else "completion", prompt, body.requested_max_tokens(), body.sampling(defaults),
                body.stop, bool(body.stream), "messages" if chat else "prompt", body.grammar(), body.wanted_logprobs())


def completion_work(served: Any, body: CompletionRequest) -> tuple[Work, ReplyFor]:
    """An OpenAI text completion as work for the ring, and the builder of its answer."""
    work = openai_work(body, served.tokenizer.encode(body.prompt), served.defaults)
    logprob_text = LogprobText(served.tokenizer) if work.logprobs is not None else None
    return work, lambda request_id, created: CompletionReply(request_id, created, body.model, body.include_usage(),
                                                             logprob_text)


def chat_work(served: Any, body: ChatCompletionRequest) -> tuple[Work, ReplyFor]:
    """An OpenAI chat completion (tool calls included) as work for the ring, and the
    builder of its answer."""
    tokenizer = served.tokenizer
    check_tools(tokenizer, body)
    tools = body.template_tools()
    work = openai_work(body, chat_tokens(tokenizer, body.chat(), tools), served.defaults)
    if grammar := tool_grammar(tokenizer, body):
        work = replace(work, grammar=grammar)
    tool_text = ToolCallText(tokenizer, tools) if tools else None
    logprob_text = LogprobText(tokenizer) if work.logprobs is not None else None
    return work, lambda request_id, created: ChatReply(request_id, created, body.model, body.include_usage(),
                                                       tool_text, logprob_text)


async def complete(request: Request, body: CompletionRequest) -> Any:
    """Answer an OpenAI text completion."""
    return await answer(request, *completion_work(request.app.state.model, body))


async def chat(request: Request, body: ChatCompletionRequest) -> Any:
    """Answer an OpenAI chat completion, tool calls included."""
    return await answer(request, *chat_work(request.app.state.model, body))
