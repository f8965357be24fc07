"""A request's events as an HTTP answer: collected into one reply, or streamed as
server-sent events."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Protocol

from pydantic import BaseModel

from http_api.errors import APIError
from http_api.events import EventFeed, KeepAlive
from spool.protocol import Delta, Event, Failed, Final, Requeued, TokenLogprob

log = logging.getLogger(__name__)


class Reply(Protocol):
    """One request's answer in one API's shapes (OpenAI's chat or text completion,
    Anthropic's message): whole, or as server-sent event frames."""

    keepalive: str

    def whole(self, text: str, final: Final, logprobs: list[TokenLogprob] | None) -> BaseModel: ...

    def opening(self) -> list[str]: ...

    def delta(self, text: str, logprobs: list[TokenLogprob] | None) -> list[str]: ...

    def closing(self, final: Final) -> list[str]: ...

    def failure(self, err: APIError) -> str: ...


def _client_gone() -> APIError:
    return APIError(499, "client closed the connection", code="client_closed")


def _finished(feed: EventFeed, final: Final) -> None:
    feed.metrics.finished(final.usage)
    log.info("request %s finished: %s, %d+%d tokens in %.3f s", feed.request_id, final.finish_reason,
             final.usage.prompt_tokens, final.usage.completion_tokens, time.monotonic() - feed.queued_at)


async def gather(feed: EventFeed, reply: Reply) -> tuple[BaseModel, Final]:
    """The whole result of a request once it ends, and its final event; APIError if it
    failed. A client gone ends it early with a 499."""
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
            _finished(feed, event)
            return reply.whole("".join(parts), event, logprobs), event
    raise _client_gone()


async def collect(feed: EventFeed, reply: Reply) -> BaseModel:
    """Wait for the whole result of a non-streaming request."""
    try:
        return (await gather(feed, reply))[0]
    finally:
        feed.close("client gone or timed out")


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


async def stream(feed: EventFeed, events: AsyncIterator[Event | KeepAlive], first: Event,
                 reply: Reply) -> AsyncIterator[str]:
    """The server-sent events of a streaming request, from its first event on (usually
    `started`, when the opening frames go out). Frames ready together go out in one
    write (the closing ones together), so a client gets them in one read."""
    # Starlette watches for the disconnect itself while it streams.
    feed.client = None
    ready: list[str] = reply.opening()
    try:
        event: Event | KeepAlive | None = first
        while event is not None:
            if isinstance(event, KeepAlive):
                ready.append(reply.keepalive)
            elif isinstance(event, Delta) and (event.text or event.logprobs):
                ready += reply.delta(event.text, event.logprobs)
            elif isinstance(event, Failed):
                ready.append(reply.failure(APIError.of(event)))
                yield "".join(ready)
                return
            elif isinstance(event, Final):
                _finished(feed, event)
                yield "".join(ready + reply.closing(event))
                return
            if ready:
                yield "".join(ready)
                ready.clear()
            event = await anext(events, None)
    except APIError as err:  # raised by the feed, so nothing is left in `ready`
        yield reply.failure(err)
    finally:
        feed.close("client disconnected or timed out mid-stream")
