"""A crash-safe request queue in a directory, shared by the HTTP front and rank 0.

Layout under the root (directories 0700, files 0600):

    incoming/<id>.json   submitted, waiting for rank 0
    claimed/<id>.json    taken by rank 0, being generated
    done/<id>.json       finished (final or error event written)
    streams/<id>.jsonl   the request's events, one JSON object a line: started (rank 0
                         admitted it), delta, requeued, then final or error
    cancel/<id>          cancel marker
    control/<id>.json    an operation on the ring (the dashboard's), waiting for rank 0
    control/<id>.done    rank 0's answer to it, taken by the API
    quarantine/<id>.json in flight during two ring failures in a row: ended with an error,
                         kept (never purged) for a person to look at
    tmp/                 files being written, renamed into place when complete
    heartbeat.json       rank 0's latest status
    supervision.json     the supervisor's latest word (restarts, last cause, given up)

A request moves between incoming/, claimed/ and done/ only by rename, which is atomic,
so it is always in exactly one of them. Ids are made here, sort by submission time and
are checked against a strict pattern before any path is built from them.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from spool.notify import DirWatch, watch_dir
from spool.protocol import (
    TERMINAL, ControlDone, ControlRequest, Delta, Event, Failed, Final, Requeued, SpoolRequest, Supervision, Usage,
    decode_event, encode_event,
)

_ID_RE = re.compile(r"[0-9]{20}-[0-9a-f]{12}")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_FALLBACK_POLL = 0.005  # seconds between looks at incoming/ without inotify
_SUBDIRS = ("incoming", "claimed", "done", "streams", "cancel", "tmp", "quarantine", "control")


def check_id(request_id: str) -> str:
    """Return `request_id` if it is a well-formed spool id, else raise ValueError."""
    if not isinstance(request_id, str) or not _ID_RE.fullmatch(request_id):
        raise ValueError(f"invalid request id: {request_id!r}")
    return request_id


def _new_id() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stuck_since_requeued(events: list[Event]) -> bool:
    """Whether a request was requeued before and has streamed no token since."""
    for event in reversed(events):
        if isinstance(event, Requeued):
            return True
        if isinstance(event, Delta) and event.token_ids:
            return False
    return False


def make_dir(path: Path) -> Path:
    """`path` (and its parents) with the spool's permissions."""
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIR_MODE)  # mkdir's mode is masked by umask; an old dir keeps its own
    return path


def write_atomic(tmp_dir: Path, dest: Path, data: bytes, durable: bool) -> None:
    """Write `data` to a temp file in `tmp_dir` and rename it to `dest`; with `durable`,
    sync both before returning. The rename comes first so a reader can start while the
    disk syncs: callers report a thing accepted only once this returns, so one lost to a
    crash in between was never accepted."""
    tmp = tmp_dir / f"{_new_id()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        os.write(fd, data)
        os.replace(tmp, dest)
        if durable:
            os.fsync(fd)
            _fsync_dir(dest.parent)  # the rename itself must survive a power cut
    finally:
        os.close(fd)


def touch(path: Path) -> None:
    """Create the empty file `path` (a marker) unless it exists."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, _FILE_MODE))


def append_durably(path: Path, data: bytes) -> None:
    """Append `data` to `path` in one O_APPEND write and sync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory; every method is safe to call from several processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for path in (self.root, *(self.root / d for d in _SUBDIRS)):
            make_dir(path)
        self._incoming = self.root / "incoming"
        self._claimed = self.root / "claimed"
        self._done = self.root / "done"
        self._streams = self.root / "streams"
        self._cancel = self.root / "cancel"
        self._tmp = self.root / "tmp"
        self._quarantine = self.root / "quarantine"
        self._control = self.root / "control"
        self._heartbeat = self.root / "heartbeat.json"
        self._supervision = self.root / "supervision.json"
        self._watch: DirWatch | None | bool = False  # False: not tried yet
        self._is_batch_line: dict[str, bool] = {}  # waiting requests already read: batch lines or not

    # -- helpers ---------------------------------------------------------------

    def _stream(self, request_id: str) -> Path:
        return self._streams / f"{check_id(request_id)}.jsonl"

    def _ids(self, directory: Path) -> list[str]:
        """Ids of the requests in `directory`, oldest first; stray files are ignored."""
        ids = [n[:-5] for n in os.listdir(directory) if n.endswith(".json")]
        return sorted(i for i in ids if _ID_RE.fullmatch(i))

    # -- front side ------------------------------------------------------------

    def submit(self, request: SpoolRequest, request_id: str | None = None) -> str:
        """Queue `request` durably; return its id: `request_id` when given (a batch line's,
        made from the batch and the line, so its runner never queues it twice: see
        known()), else a new one."""
        request_id = check_id(request_id) if request_id is not None else _new_id()
        write_atomic(self._tmp, self._incoming / f"{request_id}.json", request.model_dump_json().encode(), durable=True)
        return request_id

    def _withdraw(self, request_id: str, source: Path) -> None:
        """Finish a request that is not running as cancelled, moving it from `source` to
        done/; nothing happens if it is not there (claimed or finished meanwhile)."""
        done = self._done / f"{request_id}.json"
        try:
            # Rename wins or loses atomically against claim(): never both.
            os.rename(source / f"{request_id}.json", done)
        except FileNotFoundError:
            return
        try:
            prompt = len(SpoolRequest.model_validate_json(done.read_bytes()).prompt_tokens)
        except ValidationError:
            prompt = 0  # unreadable: cancelled all the same
        completion = len(self.streamed_tokens(request_id))
        self.append(request_id, Final(finish_reason="cancelled", usage=Usage.of(prompt, completion)))
        os.utime(done)

    def known(self, request_id: str) -> bool:
        """Whether the request was queued (waiting, running, finished or quarantined)."""
        name = f"{check_id(request_id)}.json"
        return any((d / name).exists() for d in (self._incoming, self._claimed, self._done, self._quarantine))

    def cancel(self, request_id: str) -> None:
        """Mark the request cancelled; one still waiting is withdrawn and finished here
        (a claimed one is left to rank 0, which sees the marker)."""
        touch(self._cancel / check_id(request_id))
        self._withdraw(request_id, self._incoming)

    def read_events(self, request_id: str, offset: int = 0) -> tuple[list[Event], int]:
        """Complete event lines from byte `offset`; a partial last line waits for its end."""
        try:
            with open(self._stream(request_id), "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        events = [decode_event(line) for line in data[:end].splitlines() if line]
        return events, offset + end

    def streamed_tokens(self, request_id: str) -> list[int]:
        """The completion's token ids written so far, across ring restarts (a resumed
        request goes on after them)."""
        events, _ = self.read_events(request_id)
        return [token for e in events if isinstance(e, Delta) for token in e.token_ids]

    def watch_streams(self) -> DirWatch | None:
        """A watch whose changed() names the requests with new events (None where the
        system offers no notifications, so readers poll)."""
        return watch_dir(self._streams, writes=True)

    def queue_depth(self) -> int:
        """Requests waiting in incoming/."""
        return len(self._ids(self._incoming))

    def read_heartbeat(self) -> dict | None:
        """Rank 0's latest heartbeat, or None if there is none (or it is unreadable)."""
        try:
            info = json.loads(self._heartbeat.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def read_supervision(self) -> Supervision | None:
        """The supervisor's latest record, or None when no supervisor wrote one."""
        try:
            return Supervision.model_validate_json(self._supervision.read_bytes())
        except (FileNotFoundError, ValidationError):
            return None

    def write_supervision(self, record: Supervision | None) -> None:
        """Replace the record; None removes it (a start or stop ends what it said)."""
        if record is None:
            self._supervision.unlink(missing_ok=True)
        else:
            write_atomic(self._tmp, self._supervision, record.model_dump_json().encode(), durable=False)

    def submit_control(self, control: ControlRequest) -> str:
        """Queue an operation on the ring for rank 0; return its id."""
        control_id = _new_id()
        write_atomic(self._tmp, self._control / f"{control_id}.json", control.model_dump_json().encode(), durable=False)
        return control_id

    def take_control_answer(self, control_id: str) -> ControlDone | None:
        """Rank 0's answer to an operation, once there is one (removed as it is taken)."""
        path = self._control / f"{check_id(control_id)}.done"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        path.unlink()
        return ControlDone.model_validate_json(data)

    def withdraw_control(self, control_id: str) -> None:
        """Nobody waits for this operation any more: rank 0 need not carry it out."""
        (self._control / f"{check_id(control_id)}.json").unlink(missing_ok=True)

    # -- rank-0 side -----------------------------------------------------------

    def claim(self, take_batch: bool = True) -> tuple[str, SpoolRequest] | None:
        """Take the oldest waiting interactive request into claimed/, else (with
        `take_batch`) the oldest batch line; None if there is none."""
        waiting = self._ids(self._incoming)
        self._is_batch_line = {i: self._is_batch_line[i] for i in waiting if i in self._is_batch_line}
        batch = {request_id for request_id in waiting if self._is_batch(request_id)}
        order = [i for i in waiting if i not in batch] + ([i for i in waiting if i in batch] if take_batch else [])
        for request_id in order:
            dest = self._claimed / f"{request_id}.json"
            try:
                os.rename(self._incoming / f"{request_id}.json", dest)
            except FileNotFoundError:
                continue  # withdrawn by cancel() or taken by another claimer
            try:
                return request_id, SpoolRequest.model_validate_json(dest.read_bytes())
            except ValidationError as err:
                self.finish(request_id, Failed(message=f"unreadable request: {err}", code="bad_request_file"))
        return None

    def take_controls(self) -> list[tuple[str, ControlRequest]]:
        """The operations waiting, oldest first, each taken out of the queue; an
        unreadable one is dropped (its caller times out)."""
        taken = []
        for control_id in self._ids(self._control):
            path = self._control / f"{control_id}.json"
            try:
                data = path.read_bytes()
                path.unlink()
            except FileNotFoundError:
                continue  # withdrawn meanwhile
            try:
                taken.append((control_id, ControlRequest.model_validate_json(data)))
            except ValidationError:
                continue
        return taken

    def answer_control(self, control_id: str, done: ControlDone) -> None:
        write_atomic(self._tmp, self._control / f"{check_id(control_id)}.done", done.model_dump_json().encode(),
                     durable=False)

    def _is_batch(self, request_id: str) -> bool:
        """Whether a waiting request is a batch line. Its file is read once: rank 0 asks
        at every step while batch lines wait for room."""
        if request_id not in self._is_batch_line:
            try:
                batch = json.loads((self._incoming / f"{request_id}.json").read_bytes()).get("batch")
            except (FileNotFoundError, ValueError, AttributeError):
                return False  # gone, or unreadable: claimed and failed as such
            self._is_batch_line[request_id] = bool(batch)
        return self._is_batch_line[request_id]

    def requeue_claimed(self) -> tuple[list[str], list[str]]:
        """Put requests left in claimed/ by a dead rank 0 back in incoming/, to resume
        after the tokens they streamed; return the ids requeued and those quarantined.

        One whose final event was written already only missed its move to done/; one
        cancelled meanwhile (its client gone, or the API stopped) is finished as cancelled;
        one requeued before that has streamed no token since (in flight during the last
        failure too, and stuck where it was: perhaps its cause) is ended with an error and
        quarantined rather than retried forever. One that made progress since is requeued
        again: a ring that fails twice while a long stream runs does not cost it its answer,
        and one that fails at the same token is quarantined at the next failure.
        """
        requeued, quarantined = [], []
        for request_id in self._ids(self._claimed):
            events, _ = self.read_events(request_id)
            if events and isinstance(events[-1], TERMINAL):
                os.rename(self._claimed / f"{request_id}.json", self._done / f"{request_id}.json")
                continue
            if self.is_cancelled(request_id):
                self._withdraw(request_id, self._claimed)
                continue
            if stuck_since_requeued(events):
                self.append(request_id, Failed(message="quarantined: this request was in flight during two ring "
                                               "failures in a row, with no token in between", code="quarantined"))
                os.rename(self._claimed / f"{request_id}.json", self._quarantine / f"{request_id}.json")
                quarantined.append(request_id)
                continue
            # The marker precedes the rename so readers see it before any new output.
            self.append(request_id, Requeued())
            os.rename(self._claimed / f"{request_id}.json", self._incoming / f"{request_id}.json")
            requeued.append(request_id)
        return requeued, quarantined

    def append(self, request_id: str, event: Event) -> None:
        """Append one event line; a single O_APPEND write, visible to readers at once."""
        line = encode_event(event) + b"\n"
        fd = os.open(self._stream(request_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def finish(self, request_id: str, event: Final | Failed) -> None:
        """Append the final (or error) event, then move the request to done/."""
        self.append(request_id, event)
        done = self._done / f"{request_id}.json"
        os.rename(self._claimed / f"{request_id}.json", done)
        os.utime(done)  # purge() ages requests from when they finished

    def is_cancelled(self, request_id: str) -> bool:
        return (self._cancel / check_id(request_id)).exists()

    def write_heartbeat(self, info: dict) -> None:
        """Replace heartbeat.json atomically; `time` defaults to now."""
        data = json.dumps({"time": time.time(), **info}, separators=(",", ":")).encode()
        write_atomic(self._tmp, self._heartbeat, data, durable=False)

    def purge(self, retention_s: float) -> int:
        """Delete finished requests older than `retention_s`, with their streams and markers.

        Also drops orphan cancel markers and temp files of that age. Returns requests removed.
        """
        cutoff = time.time() - retention_s
        removed = 0
        for request_id in self._ids(self._done):
            done = self._done / f"{request_id}.json"
            if done.stat().st_mtime >= cutoff:
                continue
            for path in (self._stream(request_id), self._cancel / request_id, done):
                path.unlink(missing_ok=True)
            removed += 1
        pending = {*self._ids(self._incoming), *self._ids(self._claimed)}
        strays = [p for p in self._cancel.iterdir() if p.name not in pending]
        strays += self._control.glob("*.done")  # answers whose caller gave up
        for path in (*strays, *self._tmp.iterdir()):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass  # removed meanwhile by another process
        return removed

    def wait_for_work(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a request in incoming/; True as soon as there is one."""
        if self._watch is False:
            # Watch before looking, so a submit between the look and the wait still wakes us.
            self._watch = watch_dir(self._incoming)
        deadline = time.monotonic() + timeout
        while True:
            if self.queue_depth():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._watch is None:
                time.sleep(min(left, _FALLBACK_POLL))
            else:
                self._watch.wait(left)
