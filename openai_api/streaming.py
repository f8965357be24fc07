"""A request's events as an HTTP answer: collected into one reply, or streamed as
server-sent events."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

from pydantic import BaseModel

from openai_api.errors import APIError
from openai_api.events import EventFeed, KeepAlive
from openai_api.replies import Reply
from spool.protocol import Delta, Event, Failed, Final, Requeued, Usage

log = logging.getLogger(__name__)


def _client_gone() -> APIError:
    return APIError(499, "client closed the connection", code="client_closed")


def _finished(feed: EventFeed, final: Final) -> Usage:
    feed.metrics.finished(final.usage)
    log.info("request %s finished: %s, %d+%d tokens in %.3f s", feed.request_id, final.finish_reason,
             final.usage.prompt_tokens, final.usage.completion_tokens, time.monotonic() - feed.queued_at)
    return final.usage


async def collect(feed: EventFeed, reply: Reply) -> BaseModel:
    """Wait for the whole result of a non-streaming request."""
    parts: list[str] = []
    try:
        async for event in feed.events():
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Requeued):
                parts.clear()
            elif isinstance(event, Failed):
                raise APIError.of(event)
            elif isinstance(event, Final):
                return reply.whole("".join(parts), event.finish_reason, _finished(feed, event))
        raise _client_gone()
    finally:
        feed.close("client gone or timed out")


async def first_event(feed: EventFeed, events: AsyncIterator[Event | KeepAlive]) -> Event:
    """Wait until rank 0 starts the request (or ends it) before answering a streaming
    request, so that a refusal or a timeout in the queue still gets its proper HTTP
    status, while the headers and the opening chunk go out during the prefill."""
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


def sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def stream(feed: EventFeed, events: AsyncIterator[Event | KeepAlive], first: Event, reply: Reply,
                 include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streaming request, from its first event on (usually
    `started`, when the opening chunk goes out). Events ready together go out in one
    write (the closing chunk with the usage and [DONE]), so a client gets them in one read."""
    # Starlette watches for the disconnect itself while it streams.
    feed.client = None
    fresh = FreshText()
    ready: list[str] = []
    try:
        opening = reply.opening()
        if opening is not None:
            ready.append(sse(opening))
        event: Event | KeepAlive | None = first
        while event is not None:
            if isinstance(event, KeepAlive):
                ready.append(": keep-alive\n\n")
            elif isinstance(event, Delta) and (text := fresh.take(event.text)):
                ready.append(sse(reply.delta(text)))
            elif isinstance(event, Requeued):
                fresh.restart()
            elif isinstance(event, Failed):
                ready.append(sse(APIError.of(event).envelope()))
                yield "".join(ready)
                return
            elif isinstance(event, Final):
                usage = _finished(feed, event)
                ready.append(sse(reply.closing(event.finish_reason)))
                if include_usage:
                    ready.append(sse(reply.usage(usage)))
                ready.append("data: [DONE]\n\n")
                yield "".join(ready)
                return
            if ready:
                yield "".join(ready)
                ready.clear()
            event = await anext(events, None)
    except APIError as err:  # raised by the feed, so nothing is left in `ready`
        yield sse(err.envelope())
    finally:
        feed.close("client disconnected or timed out mid-stream")
