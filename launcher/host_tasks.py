"""Tasks the launcher runs on the host of a rank or of the API: in its own process for
this machine, and over ssh as `.venv/bin/python -m launcher.host_tasks TASK ARGS` in
REMOTE_DIR for another (`Machine.task`). ARGS is a JSON list and the answer is JSON on
stdout, so either way a task gets and gives the same values.

Only light imports: every remote call starts a Python.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from launcher import log_to_stderr, processes
from launcher.processes import ProcessRef
from spool import Spool
from spool.batches import ENDED, BatchStore
from spool.protocol import Supervision


def alive(pid: int, create_time: float) -> bool:
    """Whether the process still runs (same pid and create time)."""
    return processes.running(ProcessRef(pid, create_time)) is not None


def terminate(pid: int, create_time: float) -> bool:
    """SIGTERM alone, a request to stop (rank 0 finishes its token first); False when the
    process is not running."""
    proc = processes.running(ProcessRef(pid, create_time))
    if proc is None:
        return False
    proc.terminate()
    return True


def end(pid: int, create_time: float, what: str, grace: float = processes.KILL_GRACE) -> bool:
    """SIGTERM, then SIGKILL after `grace` s (processes.end); True once the process is gone."""
    return processes.end(processes.one(ProcessRef(pid, create_time)), what, grace)


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port, with uvicorn's SO_REUSEADDR."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def heartbeat(spool_dir: str) -> dict:
    """Rank 0's heartbeat ({} when there is none), its age by this host's clock, which
    wrote it, and the supervisor's record beside it (None without one)."""
    spool = Spool(Path(spool_dir))
    beat = spool.read_heartbeat() or {}
    when = beat.get("time")
    age = time.time() - when if isinstance(when, (int, float)) else None
    supervision = spool.read_supervision()
    return {"beat": beat, "age": age, "supervision": supervision and supervision.model_dump(mode="json")}


def write_supervision(spool_dir: str, record: Optional[str]) -> None:
    """The supervisor's record (launcher/supervisor.py) beside rank 0's heartbeat; None
    removes it."""
    Spool(Path(spool_dir)).write_supervision(record and Supervision.model_validate_json(record))


def batches(spool_dir: str) -> list[dict]:
    """The batches that have not ended, oldest first: id, status and line counts."""
    running = [b for b in reversed(BatchStore(Path(spool_dir)).all()) if b.status not in ENDED]
    return [{"id": b.id, "status": b.status, **b.request_counts.model_dump()} for b in running]


def spawn(command: list[str], log_file: str, cwd: str, settings: list[str]) -> list:
    """Start `command` detached (processes.spawn) in `cwd` with the launcher's `settings`
    (KEY=value) in its environment; its [pid, create time]."""
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in settings))
    ref = processes.spawn(command, Path(log_file), cwd=cwd, env=env)
    return [ref.pid, ref.create_time]


TASKS: dict[str, Callable] = {
    "alive": alive, "terminate": terminate, "end": end, "port_free": port_free, "heartbeat": heartbeat,
    "batches": batches, "spawn": spawn, "write_supervision": write_supervision,
}


def main(argv: Optional[list[str]] = None) -> int:
    name, args = argv if argv is not None else sys.argv[1:]
    # What a task logs reaches the launcher's terminal through ssh, as its own lines do.
    log_to_stderr()
    print(json.dumps(TASKS[name](*json.loads(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
