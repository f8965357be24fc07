"""Whether the ring serves: rank 0's heartbeat and the API's /health, the wait for both
during `start` with the ranks' loading lines shown as they come, and the logs shown
when a start fails."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.hosts import HERE, HostUnreachable, Layout
from launcher.logs import print_tail
from launcher.run_state import ApiRun, RingRun
from spool.protocol import Supervision

log = logging.getLogger(__name__)

POLL = 1.0  # seconds between looks while waiting


@dataclass
class Heartbeat:
    """Rank 0's heartbeat, read on its host (its spool is a local directory there)."""

    time: float = 0.0  # by rank 0's clock; 0 when there is none
    age: Optional[float] = None  # seconds, by rank 0's host's clock
    state: str = ""  # loading, ready, stopped, failed; unreachable when its host is
    model: str = ""
    active: str = ""
    reason: str = ""
    parallel: dict = field(default_factory=dict)  # how the ranks share the model (distributed/parallel.py)
    ranks: list[dict] = field(default_factory=list)  # every rank's record (distributed/group.py)
    supervision: Optional[Supervision] = None  # the supervisor's record beside it


def read_heartbeat(layout: Layout) -> Heartbeat:
    rank0 = layout.rank0
    try:
        answer = rank0.task("heartbeat", rank0.path(layout.settings.spool_dir))
    except HostUnreachable:
        return Heartbeat(state="unreachable")
    beat = answer["beat"]
    when = beat.get("time")
    ranks = beat.get("ranks")
    return Heartbeat(
        time=when if isinstance(when, (int, float)) else 0.0,
        age=answer["age"],
        state=str(beat.get("state", "")),
        model=str(beat.get("model", "")),
        active=str(beat.get("active", "")),
        reason=str(beat.get("reason", "")),
        parallel=beat["parallel"] if isinstance(beat.get("parallel"), dict) else {},
        ranks=[r for r in ranks if isinstance(r, dict)] if isinstance(ranks, list) else [],
        supervision=answer["supervision"] and Supervision.model_validate(answer["supervision"]),
    )


def write_supervision(layout: Layout, record: Optional[Supervision]) -> None:
    """The supervisor's record on rank 0's host, next to its heartbeat; None removes it."""
    rank0 = layout.rank0
    rank0.task("write_supervision", rank0.path(layout.settings.spool_dir), record and record.model_dump_json())


def api_url(layout: Layout) -> str:
    """Where clients reach the API, which runs next to rank 0's spool."""
    host = layout.settings.api_host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if layout.rank0.is_local else layout.rank0.name
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{layout.settings.api_port}"


def health(url: str) -> tuple[int, str]:
    """Status code and reason of GET url; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, "ok"
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read()).get("reason") or err.reason
        except ValueError:
            reason = err.reason
        return err.code, str(reason)
    except (OSError, ValueError) as err:
        return 0, str(getattr(err, "reason", err))


class StartFailed(Exception):
    """Why a start failed, and which rank's log tells, when that is known."""

    def __init__(self, reason: str, failed_rank: Optional[int] = None) -> None:
        super().__init__(reason)
        self.failed_rank = failed_rank


class Progress:
    """The launcher's output (every rank's log lines) on stderr, line by line as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def show(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            sys.stderr.write(f"  | {line.replace(chr(13), '')}\n")
        sys.stderr.flush()


def wait_ready(layout: Layout, ring: RingRun, api: ApiRun) -> Heartbeat:
    """Wait until this run's heartbeat says ready and /health answers 200, showing the
    ranks' output and the heartbeat's changes as they come. Raises StartFailed."""
    settings = layout.settings
    launcher_log = settings.log_dir / "launcher.log"
    progress = Progress(launcher_log)
    deadline = time.monotonic() + settings.start_timeout
    state, code, reason = "", "", ""
    while True:
        progress.show()
        beat = read_heartbeat(layout)
        if beat.time > ring.since:
            if beat.state != state:
                log.info("heartbeat: %s", beat.state)
            state = beat.state
            if state == "failed":
                raise StartFailed(f"rank 0 failed: {beat.reason}", failed_rank=0)
            if state == "ready":
                code, reason = health(f"{api_url(layout)}/health")
                if code == 200:
                    progress.show()  # lines that came in since the last look
                    return beat
        if not ring.members():
            # mlx.launch names the first rank that failed.
            named = re.search(r"Node with rank (\d+)", launcher_log.read_text(errors="replace"))
            raise StartFailed("the ranks exited", failed_rank=int(named.group(1)) if named else None)
        if api.alive() is False:
            raise StartFailed(f"the API exited (log: {api.machine.path(settings.log_dir)}/api.log)")
        if time.monotonic() >= deadline:
            raise StartFailed(f"not ready after START_TIMEOUT={settings.start_timeout} s "
                              f"(heartbeat: {state or 'none'}, /health: {code} {reason})")
        time.sleep(POLL)


def show_failure_logs(layout: Layout, failure: StartFailed, api: Optional[ApiRun]) -> None:
    """The failed rank's log (every rank's when it is not known), then the launcher's,
    which also has the ranks' tracebacks, then the API's if it is what failed."""
    log_dir = layout.settings.log_dir
    for rank, machine in enumerate(layout.machines):
        if failure.failed_rank in (None, rank):
            file = f"{machine.path(log_dir)}/rank{rank}.log"
            print_tail(f"rank {rank} on {machine}: {file}", machine, file, 20, sys.stderr)
    print_tail(f"launcher (all ranks' output): {log_dir}/launcher.log", HERE, str(log_dir / "launcher.log"), 30,
               sys.stderr)
    if api is not None and str(failure).startswith("the API exited"):
        file = f"{api.machine.path(log_dir)}/api.log"
        print_tail(f"API: {file}", api.machine, file, 30, sys.stderr)
