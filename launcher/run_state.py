"""The pid files `start` leaves in RUN_DIR for stop, status and the next start:
launcher.pid (the process that started the ranks, and the ranks), api.pid and
supervisor.pid. JSON, each process with its host and create time."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from launcher import processes
from launcher.hosts import HostUnreachable, Machine
from launcher.processes import ProcessRef

log = logging.getLogger(__name__)

RING_FILE = "launcher.pid"
API_FILE = "api.pid"
SUPERVISOR_FILE = "supervisor.pid"  # on this machine, where the launcher runs


@dataclass
class HostProcess:
    """A process on a machine, as recorded."""

    machine: Machine
    process: ProcessRef

    def __str__(self) -> str:
        return f"pid {self.process.pid} on {self.machine}"

    def task(self, name: str, *args):
        """A host task about this process (launcher/host_tasks.py)."""
        return self.machine.task(name, self.process.pid, self.process.create_time, *args)

    def alive(self) -> Optional[bool]:
        """Whether it still runs; None when its host cannot be asked."""
        try:
            return self.task("alive")
        except HostUnreachable:
            return None

    def terminate(self) -> bool:
        """SIGTERM alone, a request to stop; False when it is not running or its host
        cannot be asked."""
        try:
            return self.task("terminate")
        except HostUnreachable:
            return False

    def end(self, what: str, grace: float = processes.KILL_GRACE) -> bool:
        """SIGTERM, then SIGKILL after `grace` s, on its host; True once it is gone."""
        try:
            return self.task("end", f"{what} ({self})", grace)
        except HostUnreachable:
            log.info("cannot reach %s to check pid %d", self.machine, self.process.pid)
            return False

    @classmethod
    def from_json(cls, data: dict):
        rest = {key: value for key, value in data.items() if key not in ("machine", "process")}
        return cls(Machine(**data["machine"]), ProcessRef(**data["process"]), **rest)


@dataclass
class RankProcess(HostProcess):
    rank: int = 0


@dataclass
class RingRun:
    """launcher.pid: the launcher (mlx.launch, mpirun or a lone rank), the leader of a
    process group that holds the local ranks."""

    launcher: ProcessRef
    since: float  # rank 0's heartbeat time before the start: later heartbeats are this run's
    ranks: list[RankProcess] = field(default_factory=list)  # once ready

    def members(self) -> list:
        """The processes of the launcher's group still running (processes.group_members)."""
        return processes.group_members(self.launcher)


@dataclass
class ApiRun(HostProcess):
    """api.pid: the API, and a digest of its settings (a restart keeps an API whose
    settings did not change)."""

    key: str = ""


def ranks_from_heartbeat(ranks: list[dict], machines: list[Machine]) -> list[RankProcess]:
    """The ranks a heartbeat lists, on the machines of the layout."""
    found = []
    for entry in ranks:
        rank = entry.get("rank")
        if isinstance(rank, int) and 0 <= rank < len(machines) and "created" in entry:
            found.append(RankProcess(machines[rank], ProcessRef(entry["pid"], entry["created"]), rank))
    return found


def save_ring(run_dir: Path, ring: RingRun) -> None:
    (run_dir / RING_FILE).write_text(json.dumps(asdict(ring)))


def save_api(run_dir: Path, api: ApiRun) -> None:
    (run_dir / API_FILE).write_text(json.dumps(asdict(api)))


def save_supervisor(run_dir: Path, ref: ProcessRef) -> None:
    (run_dir / SUPERVISOR_FILE).write_text(json.dumps(asdict(ref)))


def _read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        log.info("%s is not a pid file of this launcher: ignored", path)
        return None
    return data if isinstance(data, dict) else None


def load_ring(run_dir: Path) -> Optional[RingRun]:
    data = _read(run_dir / RING_FILE)
    if data is None:
        return None
    ranks = [RankProcess.from_json(rank) for rank in data["ranks"]]
    return RingRun(ProcessRef(**data["launcher"]), data["since"], ranks)


def load_api(run_dir: Path) -> Optional[ApiRun]:
    data = _read(run_dir / API_FILE)
    return None if data is None else ApiRun.from_json(data)


def load_supervisor(run_dir: Path) -> Optional[ProcessRef]:
    data = _read(run_dir / SUPERVISOR_FILE)
    return None if data is None else ProcessRef(**data)


def running_ring(run_dir: Path) -> Optional[RingRun]:
    """The recorded ring, if its launcher's group still runs."""
    ring = load_ring(run_dir)
    return ring if ring is not None and ring.members() else None


def running_api(run_dir: Path) -> Optional[ApiRun]:
    """The recorded API, if it still runs (and its host answers)."""
    api = load_api(run_dir)
    return api if api is not None and api.alive() else None


def forget(run_dir: Path, name: str) -> None:
    (run_dir / name).unlink(missing_ok=True)
