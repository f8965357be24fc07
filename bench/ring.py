"""The processes a benchmark measures: ranks under MPI and the API, with settings
from the benchmark alone (never a developer's `.env`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bench_env(model: str | None, **settings: str) -> dict[str, str]:
    """The environment for ranks and API: `settings`, and MODEL_REPO unless the default model."""
    env = dict(os.environ, BACKEND="mpi", MLX_RING_ENV_FILE=os.devnull, LOG_LEVEL="WARNING", **settings)
    if model:
        env["MODEL_REPO"] = model
    return env


def mpi_ranks(ranks: int, *server_args: str) -> list[str]:
    """The command for `ranks` processes of server.py under mpirun."""
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(ranks),
            sys.executable, str(REPO / "server.py"), *server_args]


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(*procs: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
