"""The spool with real files and real concurrent processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

import spool.queue
from spool import Spool
from spool.notify import WatchfilesWatch, watchfiles_watch
from spool.protocol import Delta, Failed, Final, Requeued, SpoolRequest, Started, Usage

FINAL = Final(finish_reason="stop", usage=Usage.of(1, 0))


def request(prompt: list[int] = [1], **sampling: float) -> SpoolRequest:
    return SpoolRequest(kind="completion", model="m", prompt_tokens=prompt, max_tokens=4,
                        sampling=sampling, created=0)

# Processes are started with "spawn" so no lock or inotify fd leaks from the test process.
CTX = mp.get_context("spawn")


def _submitter(root: str, who: int, count: int) -> None:
    sp = Spool(Path(root))
    for i in range(count):
        sp.submit(request([who, i]))


def _claimer(root: str, total: int, out: mp.Queue) -> None:
    """Claim and finish until `total` requests were seen."""
    sp = Spool(Path(root))
    seen = []
    while len(seen) < total:
        got = sp.claim()
        if got is None:
            sp.wait_for_work(1.0)
            continue
        request_id, request = got
        sp.append(request_id, Delta(text="x", token_ids=[1]))
        sp.finish(request_id, FINAL)
        seen.append((request_id, *request.prompt_tokens))
    out.put(seen)


def _crashing_claimer(root: str, count: int) -> None:
    """Claim `count` requests, emit some output, then die without finishing them."""
    sp = Spool(Path(root))
    for _ in range(count):
        request_id, _ = sp.claim()
        sp.append(request_id, Delta(text="lost", token_ids=[7]))
    os._exit(1)


def _names(directory: Path) -> set[str]:
    return {p.name[:-5] for p in directory.glob("*.json")}


def test_layout_and_permissions(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    sp = Spool(root)
    request_id = sp.submit(request())
    sp.append(request_id, Delta(text="hi", token_ids=[1]))
    sp.cancel(request_id)
    sp.write_heartbeat({"state": "ready"})
    for d in (root, *(root / n for n in ("incoming", "claimed", "done", "streams", "cancel", "tmp", "quarantine"))):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 4  # done request, stream, cancel marker, heartbeat
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_submit_claim_finish_roundtrip(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    first = sp.submit(request([1], temperature=0.5, seed=2**70))
    second = sp.submit(request([2]))
    assert first < second and sp.queue_depth() == 2
    assert sp.claim() == (first, request([1], temperature=0.5, seed=2**70))
    assert sp.queue_depth() == 1
    sp.append(first, Delta(text="é", token_ids=[5]))
    sp.finish(first, FINAL)
    events, offset = sp.read_events(first)
    assert events == [Delta(text="é", token_ids=[5]), FINAL]
    assert sp.read_events(first, offset) == ([], offset)
    assert _names(tmp_path / "done") == {first}
    assert sp.claim() == (second, request([2]))
    assert sp.claim() is None


def test_bad_ids_are_rejected_before_any_path_use(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    bad = ["../x", "00000000000000000001-abc", "", "a" * 33, "00000000000000000001-ABCDEFABCDEF",
           "00000000000000000001-abcdefabcdef/../../etc", "00000000000000000001-abcdefabcdef\n"]
    for request_id in bad:
        for call in (sp.cancel, sp.is_cancelled, sp.read_events,
                     lambda i: sp.append(i, Requeued()), lambda i: sp.finish(i, FINAL)):
            with pytest.raises(ValueError):
                call(request_id)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_stray_files_are_ignored(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    (tmp_path / "incoming" / "evil.json").write_text("{}")
    (tmp_path / "incoming" / "notes.txt").write_text("x")
    assert sp.queue_depth() == 0 and sp.claim() is None


def test_partial_line_waits_until_complete(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    request_id = sp.submit(request())
    sp.append(request_id, Delta(text="a", token_ids=[1]))
    stream = tmp_path / "streams" / f"{request_id}.jsonl"
    with open(stream, "ab") as f:
        f.write(b'{"type":"delta","te')
    events, offset = sp.read_events(request_id)
    assert [e.text for e in events] == ["a"]
    assert sp.read_events(request_id, offset) == ([], offset)
    with open(stream, "ab") as f:
        f.write(b'xt":"b","token_ids":[2]}\n')
    events, offset2 = sp.read_events(request_id, offset)
    assert [e.text for e in events] == ["b"] and offset2 == stream.stat().st_size


def test_missing_stream_reads_empty(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    request_id = sp.submit(request())
    assert sp.read_events(request_id, 0) == ([], 0)


def test_many_submitters_one_claimer_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    submitters, per = 4, 40
    out = CTX.Queue()
    claimer = CTX.Process(target=_claimer, args=(str(tmp_path), submitters * per, out))
    claimer.start()
    procs = [CTX.Process(target=_submitter, args=(str(tmp_path), w, per)) for w in range(submitters)]
    for p in procs:
        p.start()
    seen = out.get(timeout=120)
    for p in (*procs, claimer):
        p.join(timeout=30)
        assert p.exitcode == 0
    ids = [s[0] for s in seen]
    assert len(set(ids)) == len(ids) == submitters * per
    assert {(w, i) for _, w, i in seen} == {(w, i) for w in range(submitters) for i in range(per)}
    # Each submitter's requests were claimed in its own submission order.
    for w in range(submitters):
        assert [i for _, who, i in seen if who == w] == list(range(per))
    sp = Spool(tmp_path)
    assert _names(tmp_path / "done") == set(ids)
    assert not _names(tmp_path / "incoming") and not _names(tmp_path / "claimed")
    for request_id in ids:
        events, _ = sp.read_events(request_id)
        assert [e.type for e in events] == ["delta", "final"]


def test_crash_between_claim_and_finish_requeues(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    ids = [sp.submit(request([i])) for i in range(5)]
    crasher = CTX.Process(target=_crashing_claimer, args=(str(tmp_path), 3))
    crasher.start()
    crasher.join(timeout=60)
    assert crasher.exitcode == 1
    assert _names(tmp_path / "claimed") == set(ids[:3])
    # A request whose final event was written but not yet moved is finished, not rerun.
    sp.claim()
    sp.append(ids[3], FINAL)
    requeued, quarantined = sp.requeue_claimed()
    assert sorted(requeued) == ids[:3] and quarantined == []
    assert _names(tmp_path / "done") == {ids[3]}
    assert _names(tmp_path / "incoming") == set(ids[:3]) | {ids[4]}
    assert not _names(tmp_path / "claimed")
    events, offset = sp.read_events(ids[0])
    assert [e.type for e in events] == ["delta", "requeued"]
    # The requeued requests come out again in their original order, each exactly once.
    claimed = [sp.claim()[0] for _ in range(4)]
    assert claimed == ids[:3] + [ids[4]] and sp.claim() is None


def test_cancel_withdraws_a_waiting_request(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    request_id = sp.submit(request([1, 2, 3]))
    sp.cancel(request_id)
    assert sp.is_cancelled(request_id)
    assert sp.queue_depth() == 0 and sp.claim() is None
    events, _ = sp.read_events(request_id)
    assert events[-1] == Final(finish_reason="cancelled", usage=Usage.of(3, 0))


def test_cancel_of_a_claimed_request_leaves_it_to_rank0(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    request_id = sp.submit(request())
    sp.claim()
    assert not sp.is_cancelled(request_id)
    sp.cancel(request_id)
    assert sp.is_cancelled(request_id)
    assert _names(tmp_path / "claimed") == {request_id}
    assert sp.read_events(request_id) == ([], 0)


def test_a_requeued_request_resumes_after_its_tokens_and_is_quarantined_when_stuck(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    request_id = sp.submit(request([1, 2]))
    sp.claim()
    sp.append(request_id, Delta(text="ab", token_ids=[7, 8]))
    sp.append(request_id, Delta(text="", token_ids=[]))
    assert sp.requeue_claimed() == ([request_id], [])
    assert sp.streamed_tokens(request_id) == [7, 8]
    sp.claim()
    sp.append(request_id, Delta(text="c", token_ids=[9]))
    assert sp.streamed_tokens(request_id) == [7, 8, 9]
    # In flight during a second failure, but it had moved on: requeued again.
    assert sp.requeue_claimed() == ([request_id], [])
    sp.claim()
    sp.append(request_id, Delta(text="", token_ids=[]))
    # A third failure with no token since the last: ended, and kept where purge never looks.
    assert sp.requeue_claimed() == ([], [request_id])
    events, _ = sp.read_events(request_id)
    assert isinstance(events[-1], Failed) and events[-1].code == "quarantined"
    assert _names(tmp_path / "quarantine") == {request_id} and sp.queue_depth() == 0
    assert sp.purge(0) == 0 and _names(tmp_path / "quarantine") == {request_id}


def test_cancelled_claimed_requests_are_finished_not_requeued(tmp_path: Path) -> None:
    """A rank 0 stopped mid-generation, then the client went away (or the API stopped):
    the next rank 0 must not run the request again for nobody."""
    sp = Spool(tmp_path)
    gone, kept = sp.submit(request([1, 2, 3])), sp.submit(request([4]))
    for _ in range(2):
        sp.claim()
    sp.append(gone, Delta(text="ab", token_ids=[7, 8]))
    sp.cancel(gone)
    assert sp.requeue_claimed() == ([kept], [])
    assert _names(tmp_path / "done") == {gone} and _names(tmp_path / "incoming") == {kept}
    # The same usage shape as any other final, cached tokens included.
    assert sp.read_events(gone)[0][-1] == Final(finish_reason="cancelled", usage=Usage.of(3, 2))


def test_an_unreadable_request_fails_alone(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    bad = sp.submit(request())
    good = sp.submit(request([2]))
    (tmp_path / "incoming" / f"{bad}.json").write_text('{"kind": "chat"}')
    assert sp.claim() == (good, request([2]))
    events, _ = sp.read_events(bad)
    assert isinstance(events[-1], Failed) and events[-1].code == "bad_request_file"
    assert _names(tmp_path / "done") == {bad}


def test_heartbeat(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    assert sp.read_heartbeat() is None
    sp.write_heartbeat({"state": "ready", "active": 2})
    beat = sp.read_heartbeat()
    assert beat["state"] == "ready" and beat["active"] == 2
    assert abs(beat["time"] - time.time()) < 5
    (tmp_path / "heartbeat.json").write_text("{not json")
    assert sp.read_heartbeat() is None


def test_purge_removes_only_old_finished_requests(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    old, new, waiting = sp.submit(request()), sp.submit(request()), sp.submit(request())
    for request_id in (old, new):
        sp.claim()
        sp.append(request_id, Delta(text="t", token_ids=[1]))
        sp.cancel(request_id)
        sp.finish(request_id, FINAL)
    sp.cancel(waiting)  # withdrawn: now done, recent
    long_ago = time.time() - 7200
    os.utime(tmp_path / "done" / f"{old}.json", (long_ago, long_ago))
    stray = tmp_path / "tmp" / "crashed.tmp"
    stray.write_text("x")
    os.utime(stray, (long_ago, long_ago))
    assert sp.purge(3600) == 1
    assert _names(tmp_path / "done") == {new, waiting}
    assert not (tmp_path / "streams" / f"{old}.jsonl").exists()
    assert not (tmp_path / "cancel" / old).exists() and (tmp_path / "cancel" / new).exists()
    assert not stray.exists()
    assert sp.purge(0) == 2


def _wake_latency(sp: Spool) -> float:
    """Seconds from a submit (in another thread) to wait_for_work returning."""
    sp.wait_for_work(0)  # sets up the watch, as rank 0's loop would
    submitted = []

    def submit_later() -> None:
        time.sleep(0.2)
        submitted.append(time.monotonic())
        Spool(sp.root).submit(request())

    threading.Thread(target=submit_later).start()
    assert sp.wait_for_work(5.0)
    return time.monotonic() - submitted[0]


def test_wait_for_work_wakes_on_submit(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    assert sp.wait_for_work(0.05) is False
    if sys.platform == "linux":
        assert _has_inotify()  # the notification path, not the polling one, is under test
    assert _wake_latency(sp) < 0.05  # includes the submit's own fsyncs
    assert sp.wait_for_work(1.0)  # returns at once while work is waiting


def test_wait_for_work_wakes_through_watchfiles(tmp_path: Path, monkeypatch) -> None:
    """The watcher of systems without inotify (macOS), run here on Linux's inotify
    underneath: a submit wakes rank 0, and a stream write wakes its reader."""
    monkeypatch.setattr(spool.queue, "watch_dir", lambda path, writes=False: watchfiles_watch(path, writes))
    sp = Spool(tmp_path)
    assert sp.wait_for_work(0.02) is False
    assert isinstance(sp._watch, WatchfilesWatch)
    assert _wake_latency(sp) < 0.05
    streams = sp.watch_streams()
    request_id = sp.submit(request())
    sp.append(request_id, Started())
    assert streams.wait(2.0)
    sp.append(request_id, Started())
    deadline = time.monotonic() + 2
    while not (changed := streams.changed()) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert changed == {request_id}


def test_wait_for_work_polls_without_notifications(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spool.queue, "watch_dir", lambda path: None)
    sp = Spool(tmp_path)
    assert sp.wait_for_work(0.02) is False
    assert _wake_latency(sp) < 0.05


def _has_inotify() -> bool:
    return spool.queue.watch_dir(Path(".")) is not None
