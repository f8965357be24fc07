"""Following one request's events in the spool, as rank 0 writes them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request

from http_api.errors import APIError
from http_api.metrics import Metrics
from spool import Spool
from spool.protocol import TERMINAL, Delta, Event, Failed, Requeued

log = logging.getLogger(__name__)

EVENT_POLL = 0.001  # s between looks at a stream file without inotify: it adds to every token's latency
DISCONNECT_CHECK = 0.1  # s between checks that a waiting client is still there
HEARTBEAT_CHECK = 1.0  # s between looks at rank 0's heartbeat while a request waits
KEEPALIVE_EVERY = 5.0  # s without events before a waiting request is told the connection lives


@dataclass(frozen=True)
class KeepAlive:
    """Nothing new for KEEPALIVE_EVERY s (a long queue, a ring restarting): a stream sends
    an SSE comment, so clients and proxies see the connection is alive."""


def heartbeat_problem(beat: dict | None, max_age: float) -> str | None:
    """Why rank 0's heartbeat says the ring is not there, or None."""
    if beat is None or not isinstance(beat.get("time"), (int, float)):
        return "no heartbeat from rank 0"
    age = time.time() - beat["time"]
    if age > max_age:
        return f"last heartbeat from rank 0 was {age:.1f} s ago"
    return None


def ring_problem(spool: Spool, ring_down_after: float) -> str | None:
    """Why requests should not wait for the ring: the supervisor gave up on it, or rank
    0's heartbeat is older than RING_DOWN_AFTER; None while it is there or coming back."""
    supervision = spool.read_supervision()
    if supervision is not None and supervision.state == "gave_up":
        return f"the supervisor gave up: {supervision.reason}"
    problem = heartbeat_problem(spool.read_heartbeat(), ring_down_after)
    return None if problem is None else f"{problem}, past RING_DOWN_AFTER={ring_down_after:g} s"


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
    """The events rank 0 writes for one request. `client`, while set, is checked for a
    disconnect as the feed waits; a streaming response clears it, since Starlette then
    watches for the disconnect itself. A batch line's feed (`ring_down_after` None) waits
    out a ring that is down, and stays out of the latency histograms, since its line
    waits behind interactive requests by design."""

    def __init__(self, spool: Spool, waker: StreamWaker, request_id: str, metrics: Metrics,
                 client: Request | None, timeout: float, ring_down_after: float | None) -> None:
        self.spool, self.waker, self.request_id, self.metrics = spool, waker, request_id, metrics
        self.client = client
        self._timed = ring_down_after is not None
        waker.register(request_id)
        self.queued_at = time.monotonic()
        self._deadline = self.queued_at + timeout
        self._ring_down_after = ring_down_after
        self._offset = 0
        self._last_text: float | None = None
        self.finished = False

    async def events(self) -> AsyncIterator[Event | KeepAlive]:
        """Each event in turn, up to the request's final or error event, and a KeepAlive
        after every KEEPALIVE_EVERY s without one. Ends early when the client disconnects;
        APIError 503 once rank 0's heartbeat is older than RING_DOWN_AFTER (the request is
        cancelled, so a ring that comes back does not run it for nobody), 504 past
        REQUEST_TIMEOUT."""
        while not self.finished:
            batch = await self._next_batch()
            if batch is None:
                return
            for event in batch:
                if not isinstance(event, KeepAlive):
                    self._observe(event)
                yield event
                if self.finished:
                    return

    async def _next_batch(self) -> list[Event | KeepAlive] | None:
        """The events written since the last look, once there are some, or a KeepAlive;
        None if the client left."""
        start = time.monotonic()
        next_check, next_beat = start + DISCONNECT_CHECK, start + HEARTBEAT_CHECK
        keepalive_at = start + KEEPALIVE_EVERY
        while True:
            events, self._offset = self.spool.read_events(self.request_id, self._offset)
            if events:
                return events
            now = time.monotonic()
            if now >= self._deadline:
                log.warning("request %s timed out after %.0f s", self.request_id, now - self.queued_at)
                raise APIError(504, "no result from the ring within REQUEST_TIMEOUT", code="timeout")
            if now >= next_beat and self._ring_down_after is not None:
                problem = ring_problem(self.spool, self._ring_down_after)
                if problem is not None:
                    log.warning("request %s given up: the ring is down (%s)", self.request_id, problem)
                    raise APIError(503, f"the ring is down ({problem})",
                                   code="ring_unavailable")
                next_beat = now + HEARTBEAT_CHECK
            if now >= keepalive_at:
                return [KeepAlive()]
            wake_at = min(self._deadline, next_beat, keepalive_at)
            if self.client is not None:
                if now >= next_check:
                    if await self.client.is_disconnected():
                        return None
                    next_check = now + DISCONNECT_CHECK
                wake_at = min(wake_at, next_check)
            await self.waker.wait(self.request_id, wake_at - now)

    def _observe(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, Delta) and self._timed:
            if self._last_text is None:
                self.metrics.ttft.observe(now - self.queued_at)
            else:
                self.metrics.itl.observe(now - self._last_text)
            self._last_text = now
        elif isinstance(event, Requeued):
            log.info("request %s requeued: the ring restarted; it resumes where it was", self.request_id)
        elif isinstance(event, Failed):
            log.warning("request %s failed: %s", self.request_id, event.message)
        if isinstance(event, TERMINAL):
            self.finished = True

    def close(self, why: str) -> None:
        """Stop following; cancel the request in the spool unless it finished."""
        self.waker.forget(self.request_id)
        if not self.finished:
            self.finished = True
            self.spool.cancel(self.request_id)
            log.info("request %s cancelled: %s", self.request_id, why)
