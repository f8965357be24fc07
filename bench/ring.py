"""The processes a benchmark measures: ranks under MPI and the API, with settings
from the benchmark alone (never a developer's `.env`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def bench_env(model: str | None, **settings: str) -> dict[str, str]:
    """The environment for ranks and API: `settings`, and MODEL_REPO unless the default model."""
    env = dict(os.environ, BACKEND="mpi", MLX_RING_ENV_FILE=os.devnull, LOG_LEVEL="WARNING", **settings)
    if model:
        env["MODEL_REPO"] = model
    return env


def mpi_command(ranks: int, *command: str, bind_to: str = "none") -> list[str]:
    """`command` as `ranks` processes under mpirun on this machine; `bind_to` is
    mpirun's CPU binding (none, as launch.sh runs mlx-ring; core, Open MPI's default
    for 2 ranks)."""
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", bind_to, "-np", str(ranks), *command]


def mpi_ranks(ranks: int, *server_args: str, bind_to: str = "none") -> list[str]:
    """The command for `ranks` processes of server.py under mpirun."""
    return mpi_command(ranks, sys.executable, str(REPO / "server.py"), *server_args, bind_to=bind_to)


def start(command: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    """Start `command` in the repository; its output goes to `log`, or nowhere."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if log else out)
    finally:
        if log:
            out.close()


def stop(*procs: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def serving(model: str | None, ranks: int, **settings: str) -> Iterator[tuple[str, Path]]:
    """`ranks` ranks under MPI and the API on a fresh spool, with `settings`, until the
    block ends; yields the API's URL, once healthy, and the spool directory."""
    spool_dir = Path(tempfile.mkdtemp(prefix="mlx-ring-bench-"))
    port = free_port()
    env = bench_env(model, SPOOL_DIR=str(spool_dir), API_PORT=str(port), **settings)
    procs = (start(mpi_ranks(ranks), env), start([sys.executable, str(REPO / "api.py")], env))
    try:
        print("waiting for the ring and the API ...", flush=True)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url, spool_dir
    finally:
        stop(*reversed(procs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_healthy(url: str, timeout: float = 300, procs: tuple[subprocess.Popen, ...] = ()) -> None:
    """Until GET `url`/health answers 200; exits if it does not in time or one of `procs` ends."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if any(proc.poll() is not None for proc in procs):
            raise SystemExit(f"a process exited while waiting for {url}/health")
        time.sleep(0.3)
    raise SystemExit("the ring and API did not become healthy")


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/<pid>/stat after the command name (which may hold spaces):
    [0] state, [1] parent pid, [11] user and [12] system CPU time in clock ticks."""
    return stat.read_text().rsplit(")", 1)[1].split()


def cpu_ticks(pid: int) -> int:
    """Clock ticks `pid` has spent on the CPU, user and system."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return int(fields[11]) + int(fields[12])


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, children first (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat)
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found
