"""Turning a checked request into spool work, and answering it, streaming or not."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, replace
from functools import partial
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
from http_api.streaming import Reply, collect, first_event, outcome, stream
from http_api.tools import ToolCallText, ToolSpec, check_tools, tool_grammar
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
    choices: int = 1  # n: copies drawn from the same prompt


ReplyFor = Callable[[str, int], Reply]  # (request id, created) -> the answer's builder


def copy_seed(seed: int, index: int) -> int:
    """The seed of a request's `index`-th choice: its own seed for the first, so that n=1
    and the first of n draw alike, and one derived from it for the others, so a seeded
    request with n > 1 is reproducible."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def spool_request(state: Any, work: Work) -> SpoolRequest:
    """Checked work as the spool's request (its first choice's): budget, token-valued
    fields, and a seed drawn for a sampled request without one. APIError (400) if the
    work cannot run."""
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


def choice_requests(first: SpoolRequest, choices: int) -> list[SpoolRequest]:
    """The spool requests of `choices` copies of `first`, each drawing with its own seed."""
    seed = first.sampling.seed
    return [first if seed is None else first.model_copy(update={"sampling": first.sampling.model_copy(
        update={"seed": copy_seed(seed, index)})}) for index in range(choices)]


async def _prefill_once(request: Request, first: SpoolRequest) -> None:
    """Before the copies of a request with n > 1: a one-token request whose prompt KV rank 0
    keeps in its prompt cache as it ends, so every copy starts from it instead of computing
    the prompt again."""
    state = request.app.state
    settings: Settings = state.settings
    primer = first.model_copy(update={"max_tokens": 1, "sampling": SamplingParams(temperature=0.0), "stop": [],
                                      "grammar": None, "logprobs": None})
    request_id = await asyncio.to_thread(state.spool.submit, primer)
    log.info("request %s queued: the shared prefill of %d prompt tokens", request_id, len(first.prompt_tokens))
    feed = EventFeed(state.spool, state.waker, request_id, state.metrics, request, settings.request_timeout,
                     settings.ring_down_after)
    await outcome(feed)


async def answer(request: Request, work: Work, reply_for: ReplyFor) -> Any:
    """Queue checked work (one spool request per choice) and answer it, streaming or not."""
    state = request.app.state
    settings: Settings = state.settings
    first = spool_request(state, work)
    problem = ring_problem(state.spool, settings.ring_down_after)
    if problem is not None:
        raise APIError(503, f"the ring is down ({problem}); nothing was queued", code="ring_unavailable")
    if work.choices > 1 and (state.spool.read_heartbeat() or {}).get("prompt_cache_tokens") is not None:
        await _prefill_once(request, first)
    queued = choice_requests(first, work.choices)
    # The submits fsync: off the event loop, so other requests' tokens keep flowing meanwhile.
    request_ids = await asyncio.to_thread(lambda: [state.spool.submit(one) for one in queued])
    log.info("request %s queued: %s, %d prompt tokens, max_tokens %d, stream %s%s", request_ids[0], work.kind,
             len(work.prompt), first.max_tokens, work.stream,
             f", {work.choices} choices ({', '.join(request_ids[1:])} too)" if work.choices > 1 else "")
    feeds = [EventFeed(state.spool, state.waker, request_id, state.metrics, request, settings.request_timeout,
                       settings.ring_down_after) for request_id in request_ids]
    reply = reply_for(request_ids[0], first.created)
    if not work.stream:
        return await collect(feeds, reply)
    starts = []
    try:
        for feed in feeds:
            events = feed.events()
            starts.append((await first_event(feed, events), events))
    except BaseException:
        for feed in feeds:
            feed.close("client gone, timed out or refused before any output")
        raise
    # The background task also covers a client gone before the stream even started.
    return StreamingResponse(stream(feeds, starts, reply), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(_close_all, feeds))


def _close_all(feeds: list[EventFeed]) -> None:
    for feed in feeds:
        feed.close("client disconnected mid-stream")


def openai_work(body: GenerationRequest, prompt: list[int], defaults: SamplingParams) -> Work:
    chat = isinstance(body, ChatCompletionRequest)
    return Work("chat" if chat else "completion", prompt, body.requested_max_tokens(), body.sampling(defaults),
                body.stop, bool(body.stream), "messages" if chat else "prompt", body.grammar(), body.wanted_logprobs(),
                body.choices())


def completion_work(served: Any, body: CompletionRequest) -> tuple[Work, ReplyFor]:
    """An OpenAI text completion as work for the ring, and the builder of its answer."""
    work = openai_work(body, served.tokenizer.encode(body.prompt), served.defaults)
    logprob_text = LogprobText(served.tokenizer) if work.logprobs is not None else None
    return work, lambda request_id, created: CompletionReply(request_id, created, body.model, work.choices,
                                                             body.include_usage(), logprob_text)


@dataclass(frozen=True)
class ToolPrompt:
    """A conversation with tools, ready for the ring."""

    tokens: list[int]
    grammar: str | None  # a forced call's
    tool_text: Callable[[], ToolCallText] | None  # a parser of the calls in one choice's output
    stop: list[str]  # where the output stops beside the request's own stop strings


def tool_prompt(tokenizer: Any, messages: list[dict], spec: ToolSpec) -> ToolPrompt:
    """The conversation through the chat template with the tools, whichever API asked."""
    check_tools(tokenizer, spec)
    tools = spec.template_tools()
    tokens = chat_tokens(tokenizer, messages, tools)
    return ToolPrompt(tokens, tool_grammar(tokenizer, spec),
                      partial(ToolCallText, tokenizer, tools, spec.one_call) if tools else None,
                      [tokenizer.tool_call_end] if spec.one_call else [])


def chat_work(served: Any, body: ChatCompletionRequest) -> tuple[Work, ReplyFor]:
    """An OpenAI chat completion (tool calls included) as work for the ring, and the
    builder of its answer."""
    tokenizer = served.tokenizer
    spec = body.tool_spec()
    if spec.forced and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "tool_choice 'required' or a named function cannot go with response_format",
                       param="tool_choice")
    prompt = tool_prompt(tokenizer, body.chat(), spec)
    work = openai_work(body, prompt.tokens, served.defaults)
    work = replace(work, grammar=work.grammar or prompt.grammar, stop=work.stop + prompt.stop)
    logprob_text = LogprobText(tokenizer) if work.logprobs is not None else None
    return work, lambda request_id, created: ChatReply(request_id, created, body.model, work.choices,
                                                       body.include_usage(), prompt.tool_text, logprob_text)


async def complete(request: Request, body: CompletionRequest) -> Any:
    """Answer an OpenAI text completion."""
    return await answer(request, *completion_work(request.app.state.model, body))


async def chat(request: Request, body: ChatCompletionRequest) -> Any:
    """Answer an OpenAI chat completion, tool calls included."""
    return await answer(request, *chat_work(request.app.state.model, body))
