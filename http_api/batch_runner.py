"""The batch runner: an asyncio task of the API that feeds batches' lines into the spool as
interactive requests are fed, a few at a time, and writes each line's answer once.

Everything it knows is on disk (spool/batches.py): a batch's record, and the output and
error files its answered lines are appended to. Started again (an API restart), it reads
which lines are answered from those files, and finds the lines it had queued by their
spool ids, made from the batch and the line: no line is queued or answered twice. Rank 0
admits batch lines after interactive requests, at most BATCH_MAX_ACTIVE at once; the
runner keeps twice that many queued, so the ring never waits for it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from http_api.batch_lines import (
    BadLine, BatchOutputLine, BatchResponse, LineError, check_lines, given_custom_id, numbered_lines, parse_line,
)
from http_api.errors import APIError
from http_api.events import EventFeed
from http_api.streaming import gather
from http_api.submit import chat_work, completion_work, spool_request
from spool.batches import ENDED, Batch, BatchError, BatchErrors, BatchStore, RequestCounts, line_request_id
from spool.files import FileStore, derived_file_id
from spool.queue import append_durably

log = logging.getLogger(__name__)

POLL = 1.0  # s between looks at the batches when nothing wakes the runner
WINDOW_PER_ACTIVE = 2  # lines queued per line rank 0 may run
LINE_TIMEOUT = 24 * 3600.0  # s a line's answer is waited for: its batch expires first
_WORK = {"/v1/chat/completions": chat_work, "/v1/completions": completion_work}


@dataclass
class Job:
    """A batch being run, and what the runner knows of its lines."""

    batch: Batch
    lines: list[tuple[int, bytes]]  # the input's non-blank lines, with their numbers
    answered: set[int]  # numbers of lines whose answer is written
    failed: set[int]  # those of them in the error file
    running: dict[int, asyncio.Task] = field(default_factory=dict)
    stopping: bool = False  # cancelled or expired: no new line starts
    saved_at: float = 0.0  # time.monotonic() of the last save of its counts
    cursor: int = 0  # lines before it are answered or running: lines start in order

    def counts(self) -> RequestCounts:
        return RequestCounts(total=len(self.lines), completed=len(self.answered) - len(self.failed),
                             failed=len(self.failed))

    def take(self, count: int) -> list[tuple[int, bytes]]:
        """The next `count` lines to start (fewer at the end): unanswered, in order."""
        taken: list[tuple[int, bytes]] = []
        while len(taken) < count and self.cursor < len(self.lines):
            number, raw = self.lines[self.cursor]
            self.cursor += 1
            if number not in self.answered:
                taken.append((number, raw))
        return taken


class BatchRunner:
    def __init__(self, state: Any) -> None:
        self.state = state
        self.store = BatchStore(state.settings.spool_dir)
        self.files = FileStore(state.settings.spool_dir)
        self.jobs: dict[str, Job] = {}
        self.wake = asyncio.Event()
        self.rescan = True  # look for new or cancelled batches at the next tick, not only every POLL s
        self._scanned_at = 0.0
        self._lock_fd: Optional[int] = None

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Run batches until cancelled (the API stopping)."""
        try:
            while True:
                if self._owns_batches():
                    try:
                        await self._tick()
                    except Exception:
                        log.exception("batch runner: tick failed; trying again")
                try:
                    async with asyncio.timeout(POLL):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                self.wake.clear()
        finally:
            tasks = [task for job in self.jobs.values() for task in job.running.values()]
            for task in tasks:
                task.cancel()  # their lines stay queued in the spool, for the next runner
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def _owns_batches(self) -> bool:
        """One runner per spool: the one holding the lock (another API on the same spool
        leaves its batches to it, and takes over when it is gone)."""
        if self._lock_fd is None:
            fd = os.open(self.store.root / "runner.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._lock_fd = fd
        return True

    async def _tick(self) -> None:
        if self.rescan or time.monotonic() - self._scanned_at >= POLL:
            await self._scan()
        room = self.state.settings.batch_max_active * WINDOW_PER_ACTIVE - sum(
            len(job.running) for job in self.jobs.values())
        for job in list(self.jobs.values()):
            for number, raw in [] if job.stopping else job.take(max(room, 0)):
                job.running[number] = asyncio.create_task(self._answer(job, number, raw))
                room -= 1
            if not job.running and (job.stopping or len(job.answered) == len(job.lines)):
                await asyncio.to_thread(self._finalize, job)
                del self.jobs[job.batch.id]
            elif job.batch.request_counts != job.counts() and time.monotonic() - job.saved_at >= POLL:
                job.batch.request_counts, job.saved_at = job.counts(), time.monotonic()
                await asyncio.to_thread(self.store.save, job.batch)
        self.state.metrics.batch_progress({job.batch.id: job.counts() for job in self.jobs.values()})

    async def _scan(self) -> None:
        """Take up new batches; stop those cancelled or past their window."""
        self.rescan, self._scanned_at = False, time.monotonic()
        for batch in reversed(await asyncio.to_thread(self.store.all)):  # oldest first
            if batch.status not in ENDED and batch.id not in self.jobs:
                if (job := await asyncio.to_thread(self._load, batch)) is not None:
                    self.jobs[batch.id] = job
        for job in self.jobs.values():
            if not job.stopping and (job.batch.status == "cancelling" or self.store.cancel_requested(job.batch.id)
                                     or time.time() >= job.batch.expires_at):
                job.stopping = True  # before its lines' cancels land: theirs is no failure
                await asyncio.to_thread(self._stop, job)

    # -- one batch --------------------------------------------------------------

    def _load(self, batch: Batch) -> Optional[Job]:
        """A batch to run: validated first if it is new; None if it failed."""
        path = self.files.content_path(batch.input_file_id)
        try:
            lines = numbered_lines(path.read_bytes())
        except FileNotFoundError:
            self._fail(batch, BatchError(code="file_not_found", message="the input file is gone"))
            return None
        if batch.status == "validating":
            if not self._validate(batch, lines):
                return None
        job = Job(batch, lines, *self._answered(batch, lines))
        job.stopping = batch.status == "finalizing"
        log.info("batch %s: %s, %d of %d lines answered", batch.id, batch.status, len(job.answered), len(lines))
        return job

    def _validate(self, batch: Batch, lines: list[tuple[int, bytes]]) -> bool:
        """Check every line; bad ones are listed in the batch's errors and answered in its
        error file. False (the batch failed) if no line can run."""
        errors = check_lines(lines, batch.endpoint, self.state.model.names)
        if len(errors) == len(lines):
            self._fail(batch, *errors or [BatchError(code="empty_file", message="the input file has no lines")])
            return False
        raw = dict(lines)
        answers = b"".join(self._line_json(batch, e.line, given_custom_id(raw[e.line]),
                                           error=LineError(code=e.code, message=e.message)) for e in errors)
        self.store.replace_answers(batch.id, "errors", answers)  # a validation cut short is done again whole
        batch.errors = BatchErrors(data=errors) if errors else None
        batch.status, batch.in_progress_at = "in_progress", int(time.time())
        batch.request_counts = RequestCounts(total=len(lines), failed=len(errors))
        self.store.save(batch)
        log.info("batch %s: %d lines, %d bad; in progress", batch.id, len(lines), len(errors))
        return True

    def _fail(self, batch: Batch, *errors: BatchError) -> None:
        batch.status, batch.failed_at = "failed", int(time.time())
        batch.errors = BatchErrors(data=list(errors))
        self.store.save(batch)
        log.info("batch %s failed: %s", batch.id, errors[0].message)

    def _answered(self, batch: Batch, lines: list[tuple[int, bytes]]) -> tuple[set[int], set[int]]:
        """The lines whose answers the batch's files hold, and those of them that failed; a
        last line cut short by a crash is dropped, so its line is answered again."""
        by_id = {f"batch_req_{line_request_id(batch, n)}": n for n, _ in lines}
        answered: dict[str, set[int]] = {"output": set(), "errors": set()}
        for kind in answered:
            path = self.store.answers(batch.id, kind)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            whole = data[:data.rfind(b"\n") + 1]
            if len(whole) < len(data):
                os.truncate(path, len(whole))
            answered[kind] = {by_id[BatchOutputLine.model_validate_json(line).id] for line in whole.splitlines()}
        return answered["output"] | answered["errors"], answered["errors"]

    def _stop(self, job: Job) -> None:
        """Cancel (or expire) a batch: every line queued in the spool and not answered is
        cancelled there (a runner before this one may have queued some); the answers
        written stay."""
        job.batch.status, job.batch.cancelling_at = "cancelling", job.batch.cancelling_at or int(time.time())
        self.store.save(job.batch)
        spool = self.state.spool
        for number in (n for n, _ in job.lines if n not in job.answered):
            if spool.known(request_id := line_request_id(job.batch, number)):
                spool.cancel(request_id)
        log.info("batch %s: stopping, %d lines running", job.batch.id, len(job.running))

    def _finalize(self, job: Job) -> None:
        """Publish the batch's output and error files and end it. Done again from the start
        after a crash: the files' ids are the batch's own, so each is published once."""
        batch, now = job.batch, int(time.time())
        if batch.status != "finalizing":  # else its counts were saved before its files moved
            batch.status, batch.finalizing_at, batch.request_counts = "finalizing", now, job.counts()
            self.store.save(batch)
        for kind in ("output", "errors"):
            path, file_id = self.store.answers(batch.id, kind), derived_file_id(batch.id, kind)
            if self.files.get(file_id) or (path.exists() and path.stat().st_size):
                self.files.adopt(file_id, f"{batch.id}_{kind}.jsonl", "batch_output", path)
                setattr(batch, "output_file_id" if kind == "output" else "error_file_id", file_id)
        if self.store.cancel_requested(batch.id):
            batch.status, batch.cancelled_at = "cancelled", now
        elif now >= batch.expires_at and (counts := batch.request_counts).completed + counts.failed < counts.total:
            batch.status, batch.expired_at = "expired", now
        else:
            batch.status, batch.completed_at = "completed", now
        self.store.save(batch)
        log.info("batch %s %s: %d completed, %d failed of %d", batch.id, batch.status,
                 batch.request_counts.completed, batch.request_counts.failed, batch.request_counts.total)

    # -- one line ---------------------------------------------------------------

    async def _answer(self, job: Job, number: int, raw: bytes) -> None:
        """Run one line and write its answer; a line cut short by its batch's cancel stays
        unanswered. It leaves `running` only once answered, so it never runs twice."""
        request_id = line_request_id(job.batch, number)
        try:
            try:
                answer = await self._run(job, request_id, raw)
                if answer is None:
                    if job.stopping:
                        return
                    raise APIError(500, "this line was cancelled on the ring", code="cancelled")
                kind, line = "output", self._line_json(job.batch, number, answer[0], response=BatchResponse(
                    status_code=200, request_id=request_id, body=answer[1]))
            except APIError as err:
                kind, line = "errors", self._line_json(job.batch, number, given_custom_id(raw), response=BatchResponse(
                    status_code=err.status_code, request_id=request_id, body=err.envelope().model_dump()))
            except Exception:
                log.exception("batch %s line %d failed", job.batch.id, number)
                kind, line = "errors", self._line_json(job.batch, number, given_custom_id(raw), error=LineError(
                    code="internal_error", message="internal error while running this line"))
            await asyncio.to_thread(append_durably, self.store.answers(job.batch.id, kind), line)
            job.answered.add(number)
            if kind == "errors":
                job.failed.add(number)
        finally:
            job.running.pop(number, None)
            self.wake.set()

    async def _run(self, job: Job, request_id: str, raw: bytes) -> Optional[tuple[str, dict]]:
        """The line's custom_id and answer body, once rank 0 has finished it; queued first
        unless an earlier run queued it. None if it was cancelled."""
        state = self.state
        try:
            custom_id, body = parse_line(raw, job.batch.endpoint, state.model.names)
        except BadLine as bad:  # the served names changed since validation
            raise APIError(400, bad.message, param=bad.param, code=bad.code) from None
        work, reply_for = _WORK[job.batch.endpoint](state.model, body)
        if not await asyncio.to_thread(state.spool.known, request_id):
            queued = spool_request(state, work).model_copy(update={"batch": job.batch.id})
            await asyncio.to_thread(state.spool.submit, queued, request_id)
        feed = EventFeed(state.spool, state.waker, request_id, state.metrics, None, LINE_TIMEOUT, None)
        try:
            whole, final = await gather(feed, reply_for(request_id, int(time.time())))
        finally:
            state.waker.forget(request_id)
        return None if final.finish_reason == "cancelled" else (custom_id, whole.model_dump(mode="json"))

    @staticmethod
    def _line_json(batch: Batch, number: int, custom_id: Optional[str], **answer: Any) -> bytes:
        line = BatchOutputLine(id=f"batch_req_{line_request_id(batch, number)}", custom_id=custom_id, **answer)
        return line.model_dump_json().encode() + b"\n"
