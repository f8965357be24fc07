"""The links between simulated machines that bench/scaling.py measures: MPI, MLX's ring
backend over loopback TCP, and the ring backend through bench/slow_link.py's relay,
which delays every chunk each way (a slow link, like Wi-Fi).

Every rank is pinned to a core of its own (rank r on core r) with one BLAS thread
(the caller's environment). On the ring links each rank is started on its own, with
the MLX_RANK and MLX_HOSTFILE that mlx.launch would give it, so no launcher's I/O loop
shares its core (the stock mlx.launch spins one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.ring import free_port, mpi_command, start
from bench.slow_link import ring_hostfiles

LINKS = {
    "mpi": "MPI",
    "ring": "ring, loopback TCP",
    "slow": "ring through a relay delaying {delay_ms:g} ms each way",
}


def describe(link: str, delay_ms: float) -> str:
    return LINKS[link].format(delay_ms=delay_ms)


def ranks_on(link: str, ranks: int, command: list[str], env: dict[str, str], log: Path,
             delay_ms: float) -> list[subprocess.Popen]:
    """`command` as `ranks` pinned processes joined by `link`; BACKEND (mlx-ring's
    setting) is set to match. Returns every process started (ranks, launcher, relay)."""
    if link == "mpi":
        return [start(mpi_command(ranks, *command, bind_to="core"), env | {"BACKEND": "mpi"}, log)]
    env = env | {"BACKEND": "ring"}
    ports = [free_port() for _ in range(ranks)]
    procs = []
    relays = ports
    if link == "slow":
        relays = [free_port() for _ in range(ranks)]
        pairs = [f"--relay={relay}:{port}" for relay, port in zip(relays, ports)]
        procs.append(start([sys.executable, "-m", "bench.slow_link", f"--delay-ms={delay_ms}", *pairs], env, log))
    hostfiles = ring_hostfiles(ports, relays, Path(tempfile.mkdtemp(prefix="mlx-ring-links-")))
    cores = os.cpu_count()
    for rank in range(ranks):
        rank_env = env | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfiles[rank])}
        procs.append(start(["taskset", "-c", str(rank % cores), *command], rank_env, log))
    return procs
