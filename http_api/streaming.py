"""A request's events as an HTTP answer: collected into one reply, or streamed as
server-sent events. A request with n choices is n spool requests, one feed each."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from pydantic import BaseModel

from http_api.errors import APIError
from http_api.events import EventFeed, KeepAlive
from spool.protocol import Delta, Event, Failed, Final, Requeued, TokenLogprob, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One choice's whole result."""

    text: str
    final: Final
    logprobs: list[TokenLogprob] | None


class Reply(Protocol):
    """One request's answer in one API's shapes (OpenAI's chat or text completion,
    Anthropic's message): whole, or as server-sent event frames. `index` is the choice's."""

    keepalive: str

    def whole(self, outcomes: list[Outcome], usage: Usage) -> BaseModel: ...

    def opening(self) -> list[str]: ...

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[str]: ...

    def choice_end(self, index: int, final: Final) -> list[str]: ...

    def closing(self, finals: list[Final], usage: Usage) -> list[str]: ...

    def failure(self, err: APIError) -> str: ...


def total_usage(finals: list[Final]) -> Usage:
    """The usage of n choices as OpenAI counts it: the prompt once, the completions (and
    their accepted speculative proposals) summed; cached tokens are those every choice
    took from the prompt cache."""
    first = finals[0].usage
    return Usage.of(first.prompt_tokens, sum(f.usage.completion_tokens for f in finals),
                    min(f.usage.prompt_tokens_details.cached_tokens for f in finals),
                    sum(f.usage.completion_tokens_details.accepted_prediction_tokens for f in finals))


def _client_gone() -> APIError:
    return APIError(499, "client closed the connection", code="client_closed")


def finished(feed: EventFeed, final: Final) -> None:
    feed.metrics.finished(final.usage)
    log.info("request %s finished: %s, %d+%d tokens in %.3f s", feed.request_id, final.finish_reason,
             final.usage.prompt_tokens, final.usage.completion_tokens, time.monotonic() - feed.queued_at)


async def _outcome(feed: EventFeed) -> Outcome:
    """One spool request's whole result once it ends; APIError if it failed. A client
    gone ends it early with a 499."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] | None = None
    async for event in feed.events():
        if isinstance(event, Delta):
            parts.append(event.text)
            if event.logprobs is not None:
                logprobs = (logprobs or []) + event.logprobs
        elif isinstance(event, Failed):
            raise APIError.of(event)
        elif isinstance(event, Final):
            finished(feed, event)
            return Outcome("".join(parts), event, logprobs)
    raise _client_gone()


async def gather(feed: EventFeed, reply: Reply) -> tuple[BaseModel, Final]:
    """The whole answer of a one-choice request once it ends, and its final event; the
    feed stays open (a batch line's request stays queued if its runner stops)."""
    result = await _outcome(feed)
    return reply.whole([result], result.final.usage), result.final


async def outcome(feed: EventFeed) -> Outcome:
    """One spool request's whole result; the request is cancelled if it did not end."""
    try:
        return await _outcome(feed)
    finally:
        feed.close("client gone or timed out")


async def collect(feeds: list[EventFeed], reply: Reply) -> BaseModel:
    """Wait for every choice of a non-streaming request; the first error ends them all."""
    # asyncio.gather, not a TaskGroup: the API runs on Python 3.10 too.
    tasks = [asyncio.ensure_future(outcome(feed)) for feed in feeds]
    try:
        outcomes = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return reply.whole(outcomes, total_usage([o.final for o in outcomes]))


async def first_event(feed: EventFeed, events: AsyncIterator[Event | KeepAlive]) -> Event:
    """Wait until rank 0 starts the request (or ends it) before answering a streaming
    request, so that a refusal or a timeout in the queue still gets its proper HTTP
    status, while the headers and the opening frames go out during the prefill."""
    try:
        async for event in events:
            if isinstance(event, Failed):
                raise APIError.of(event)
            if not isinstance(event, (Requeued, KeepAlive)):
                return event
        raise _client_gone()
    except BaseException:
        feed.close("client gone or timed out before any output")
        raise


async def _follow(index: int, first: Event, events: AsyncIterator[Event | KeepAlive],
                  merged: asyncio.Queue) -> None:
    """One choice's events, from its first on, into the merged queue; an error goes there too."""
    try:
        await merged.put((index, first))
        async for event in events:
            await merged.put((index, event))
    except APIError as err:
        await merged.put((index, err))


async def _merged(starts: list[tuple[Event, AsyncIterator[Event | KeepAlive]]]
                  ) -> AsyncIterator[tuple[int, Event | KeepAlive | APIError | None]]:
    """The events of every choice as they come, each with its choice's index; then None
    once that choice's events end (after its final event, or with the client gone)."""
    merged: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_follow(i, first, events, merged)) for i, (first, events) in enumerate(starts)]
    for index, task in enumerate(tasks):
        task.add_done_callback(lambda _, index=index: merged.put_nowait((index, None)))
    try:
        while True:
            yield await merged.get()
    finally:
        for task in tasks:
            task.cancel()


async def stream(feeds: list[EventFeed], starts: list[tuple[Event, AsyncIterator[Event | KeepAlive]]],
                 reply: Reply) -> AsyncIterator[str]:
    """The server-sent events of a streaming request, from each choice's first event on
    (usually `started`, when the opening frames go out). Frames ready together go out in
    one write (the closing ones together), so a client gets them in one read."""
    for feed in feeds:
        feed.client = None  # Starlette watches for the disconnect itself while it streams.
    ready: list[str] = reply.opening()
    finals: dict[int, Final] = {}
    try:
        async with aclosing(_merged(starts)) as merged:
            async for index, event in merged:
                if isinstance(event, KeepAlive):
                    ready.append(reply.keepalive)
                elif isinstance(event, Delta) and (event.text or event.logprobs):
                    ready += reply.delta(index, event.text, event.logprobs)
                elif isinstance(event, (Failed, APIError)):
                    ready.append(reply.failure(APIError.of(event) if isinstance(event, Failed) else event))
                    yield "".join(ready)
                    return
                elif isinstance(event, Final):
                    finished(feeds[index], event)
                    finals[index] = event
                    ready += reply.choice_end(index, event)
                    if len(finals) == len(feeds):
                        ordered = [finals[i] for i in range(len(feeds))]
                        yield "".join(ready + reply.closing(ordered, total_usage(ordered)))
                        return
                elif event is None and index not in finals:
                    return  # the client left
                if ready:
                    yield "".join(ready)
                    ready.clear()
    except APIError as err:  # from a reply (a tool call that does not parse): nothing is left in `ready`
        yield reply.failure(err)
    finally:
        for feed in feeds:
            feed.close("client disconnected or timed out mid-stream")
