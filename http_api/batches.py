"""OpenAI's Batch API: thin routes over spool/batches.py; the batch runner
(http_api/batch_runner.py) does the work."""

from __future__ import annotations

import asyncio
import time
from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from http_api.errors import ERROR_RESPONSES, APIError, stored_or_404
from http_api.files import file_or_404
from http_api.schemas import Strict
from spool.batches import ENDED, Batch, BatchStore, Endpoint, check_batch_id, new_batch_id
from spool.files import FileStore

router = APIRouter()
COMPLETION_WINDOW = 24 * 3600  # s: "24h", the only window OpenAI offers


class BatchCreateRequest(Strict):
    input_file_id: str
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: Optional[dict[str, str]] = Field(None, max_length=16)


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


def _store(request: Request) -> BatchStore:
    return BatchStore(request.app.state.settings.spool_dir)


def _shown(store: BatchStore, batch: Batch) -> Batch:
    """The batch as the runner left it, cancelling already once a cancel was asked for."""
    if batch.status in ("validating", "in_progress") and store.cancel_requested(batch.id):
        return batch.model_copy(update={"status": "cancelling", "cancelling_at": int(time.time())})
    return batch


def _batch_or_404(store: BatchStore, batch_id: str) -> Batch:
    return stored_or_404(store.get, check_batch_id, "Batch", batch_id)


@router.post("/v1/batches", response_model=Batch, responses=ERROR_RESPONSES)
async def create_batch(body: BatchCreateRequest, request: Request) -> Batch:
    """A batch of the input file's lines, validated and run by the batch runner."""
    state = request.app.state
    input_file = file_or_404(FileStore(state.settings.spool_dir), body.input_file_id)
    if input_file.purpose != "batch":
        raise APIError(400, f"the input file's purpose is {input_file.purpose!r}, not 'batch'",
                       param="input_file_id", code="invalid_value")
    now = int(time.time())
    batch = Batch(id=new_batch_id(), endpoint=body.endpoint, input_file_id=input_file.id,
                  completion_window=body.completion_window, created_at=now, expires_at=now + COMPLETION_WINDOW,
                  metadata=body.metadata)
    await asyncio.to_thread(_store(request).save, batch)
    state.batch_runner.rescan = True
    state.batch_runner.wake.set()
    return batch


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(request: Request, after: Optional[str] = None,
                       limit: int = Query(20, ge=1, le=100)) -> BatchList:
    """Newest first; `after` a batch id, as OpenAI pages them."""
    store = _store(request)
    batches = await asyncio.to_thread(store.all)
    if after is not None:
        ids = [b.id for b in batches]
        batches = batches[ids.index(after) + 1:] if after in ids else []
    page = [_shown(store, b) for b in batches[:limit]]
    return BatchList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                     has_more=len(batches) > limit)


@router.get("/v1/batches/{batch_id}", response_model=Batch, responses=ERROR_RESPONSES)
async def get_batch(request: Request, batch_id: str) -> Batch:
    store = _store(request)
    return _shown(store, _batch_or_404(store, batch_id))


@router.post("/v1/batches/{batch_id}/cancel", response_model=Batch, responses=ERROR_RESPONSES)
async def cancel_batch(request: Request, batch_id: str) -> Batch:
    """Stop a batch: the lines answered stay in its output; those running are cancelled."""
    store = _store(request)
    batch = _batch_or_404(store, batch_id)
    if batch.status in ENDED and batch.status != "cancelled":
        raise APIError(409, f"the batch is {batch.status}; only a running batch can be cancelled",
                       code="batch_not_running")
    if batch.status in ("validating", "in_progress"):
        store.request_cancel(batch.id)
        request.app.state.batch_runner.rescan = True
        request.app.state.batch_runner.wake.set()
    return _shown(store, batch)
