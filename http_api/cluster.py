"""The cluster's own routes: its state (`GET /v1/cluster`), the same as server-sent
events every second (`GET /v1/cluster/events`, the dashboard's live figures), and
dropping the prompt cache on every rank (`POST /v1/cluster/reset_prefix_cache`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from http_api.cluster_view import ClusterStatus, cluster_status
from http_api.errors import ERROR_RESPONSES, APIError
from http_api.events import ring_problem
from spool import Spool
from spool.protocol import ControlDone, ControlRequest

log = logging.getLogger(__name__)

EVENTS_EVERY = 1.0  # s between the cluster's events: rank 0 writes its heartbeat each second
CONTROL_POLL = 0.02  # s between looks for rank 0's answer to an operation
CONTROL_TIMEOUT = 30.0  # s rank 0 gets to answer (it looks between two steps of the ring)

router = APIRouter()


class ResetPrefixCacheRequest(BaseModel):
    """No fields: any field sent is refused."""

    model_config = ConfigDict(extra="forbid")


def _status(request: Request) -> ClusterStatus:
    spool: Spool = request.app.state.spool
    state = request.app.state
    return cluster_status(spool.read_heartbeat(), spool.read_supervision(), spool.queue_depth(), state.settings,
                          state.model.names)


@router.get("/v1/cluster", response_model=ClusterStatus, responses=ERROR_RESPONSES)
async def cluster(request: Request) -> ClusterStatus:
    return _status(request)


@router.get("/v1/cluster/events", responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
async def cluster_events(request: Request) -> StreamingResponse:
    """The cluster's state as a server-sent event (`event: cluster`) now and every
    EVENTS_EVERY s, until the client goes (Starlette ends the stream then)."""

    async def events() -> AsyncIterator[str]:
        while True:
            yield f"event: cluster\ndata: {_status(request).model_dump_json()}\n\n"
            await asyncio.sleep(EVENTS_EVERY)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/cluster/reset_prefix_cache", response_model=ControlDone, responses=ERROR_RESPONSES)
async def reset_prefix_cache(request: Request, body: ResetPrefixCacheRequest | None = None) -> ControlDone:
    """Queue the reset for rank 0, which drops every stored prompt cache on every rank,
    and wait for its answer."""
    settings = request.app.state.settings
    spool: Spool = request.app.state.spool
    problem = ring_problem(spool, settings.ring_down_after)
    if problem is not None:
        raise APIError(503, f"the ring is down ({problem}); nothing was queued", code="ring_unavailable")
    control_id = spool.submit_control(ControlRequest(action="reset_prefix_cache"))
    deadline = time.monotonic() + min(CONTROL_TIMEOUT, settings.request_timeout)
    while (done := spool.take_control_answer(control_id)) is None:
        if time.monotonic() > deadline:
            spool.withdraw_control(control_id)
            raise APIError(504, "rank 0 did not reset the prompt cache in time", code="timeout")
        await asyncio.sleep(CONTROL_POLL)
    log.info("prompt cache reset: %d entries, %d tokens dropped", done.dropped_entries, done.dropped_tokens)
    return done
