"""Batches (OpenAI's Batch API), kept under the spool directory so that they outlive the
API and the ring.

Layout under `<spool>/batches/` (directories 0700, files 0600, as the spool's):

    <id>.json          the batch (OpenAI's batch object), replaced atomically
    <id>.output.jsonl  answers of its lines so far, one JSON object a line, appended and
    <id>.errors.jsonl  synced one by one: the record of which lines are answered
    <id>.cancel        cancel marker, left by the API's cancel route for the runner

Only the runner (http_api/batch_runner.py) changes a batch once it is created; a cancel
reaches it by the marker, so a route never writes over the runner's record. A line's
spool request id is made from the batch and the line number (line_request_id), so a
runner started again finds the lines it queued before instead of queueing them twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel

from spool.queue import make_dir, touch, write_atomic

_BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")

Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                 "cancelled"]
ENDED = ("failed", "completed", "expired", "cancelled")
Endpoint = Literal["/v1/chat/completions", "/v1/completions"]


class BatchError(BaseModel):
    """A problem with the batch or one of its input lines (`line`, counted from 1)."""

    code: str
    message: str
    param: Optional[str] = None
    line: Optional[int] = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = []


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    """OpenAI's batch object, as stored and as answered."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: Endpoint
    input_file_id: str
    completion_window: Literal["24h"]
    status: Status = "validating"
    errors: Optional[BatchErrors] = None
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None
    created_at: int
    in_progress_at: Optional[int] = None
    expires_at: int
    finalizing_at: Optional[int] = None
    completed_at: Optional[int] = None
    failed_at: Optional[int] = None
    expired_at: Optional[int] = None
    cancelling_at: Optional[int] = None
    cancelled_at: Optional[int] = None
    request_counts: RequestCounts = RequestCounts()
    metadata: Optional[dict[str, str]] = None


def check_batch_id(batch_id: str) -> str:
    """`batch_id` if it is a well-formed batch id, else ValueError."""
    if not isinstance(batch_id, str) or not _BATCH_ID.fullmatch(batch_id):
        raise ValueError(f"invalid batch id: {batch_id!r}")
    return batch_id


def new_batch_id() -> str:
    """A new id; ids sort by creation, to the microsecond."""
    return f"batch_{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


def line_request_id(batch: Batch, line: int) -> str:
    """The spool request id of the batch's `line`: the same on every run, in line order
    within the batch (the spool's ids sort by their number)."""
    suffix = hashlib.sha256(f"{batch.id}:{line}".encode()).hexdigest()[:12]
    return f"{batch.created_at * 10**9 + line:020d}-{suffix}"


class BatchStore:
    def __init__(self, spool_root: Path) -> None:
        self.root = make_dir(Path(spool_root) / "batches")
        self._tmp = make_dir(Path(spool_root) / "tmp")

    def _path(self, batch_id: str, suffix: str) -> Path:
        return self.root / f"{check_batch_id(batch_id)}{suffix}"

    def save(self, batch: Batch) -> None:
        write_atomic(self._tmp, self._path(batch.id, ".json"), batch.model_dump_json().encode(), durable=True)

    def get(self, batch_id: str) -> Batch | None:
        try:
            return Batch.model_validate_json(self._path(batch_id, ".json").read_bytes())
        except FileNotFoundError:
            return None

    def all(self) -> list[Batch]:
        """Every batch, newest first."""
        batches = [self.get(name[:-5]) for name in os.listdir(self.root)
                   if name.endswith(".json") and _BATCH_ID.fullmatch(name[:-5])]
        return sorted((b for b in batches if b), key=lambda b: b.id, reverse=True)

    def answers(self, batch_id: str, kind: Literal["output", "errors"]) -> Path:
        """The file of the batch's answered lines of `kind`."""
        return self._path(batch_id, f".{kind}.jsonl")

    def replace_answers(self, batch_id: str, kind: Literal["output", "errors"], data: bytes) -> None:
        write_atomic(self._tmp, self.answers(batch_id, kind), data, durable=True)

    def request_cancel(self, batch_id: str) -> None:
        touch(self._path(batch_id, ".cancel"))

    def cancel_requested(self, batch_id: str) -> bool:
        return self._path(batch_id, ".cancel").exists()
