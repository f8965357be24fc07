"""The command line that starts the ranks: a lone rank as is, `mpirun` for BACKEND=mpi,
`mlx.launch` (without its busy loop, launcher/mlx_launch.py) otherwise."""

from __future__ import annotations

import json
import os

from config import REPO_DIR
from launcher import LaunchError
from launcher.hosts import HERE, Layout, addresses


def ring_command(layout: Layout) -> list[str]:
    settings = layout.settings
    # With a remote host every rank runs where the repository is on the hosts.
    at = layout.remote_path if layout.remote_machines() else str
    server = [at(HERE.python), at(REPO_DIR / "server.py"), "--log-file", f"{at(settings.log_dir)}/rank{{rank}}.log"]
    if layout.machines == [HERE]:
        return server
    if settings.backend == "mpi":
        return mpirun_command(layout, server)
    return mlx_launch_command(layout, server)


def mlx_launch_command(layout: Layout, server: list[str]) -> list[str]:
    settings = layout.settings
    command = [HERE.python, "-m", "launcher.mlx_launch", "--starting-port", str(settings.ring_port)]
    # With BACKEND=any, mlx.launch chooses: the hostfile's backend, else ring.
    if settings.backend != "any":
        command += ["--backend", settings.backend]
    if settings.hostfile is not None:
        command += ["--hostfile", str(settings.hostfile)]
    elif layout.hosts:
        hostfile = settings.run_dir / "hostfile.json"
        hostfile.write_text(json.dumps(ring_hostfile(layout), indent=1))
        command += ["--hostfile", str(hostfile)]
    else:
        command += ["-n", str(len(layout.machines))]
    if layout.remote_machines():
        command += ["--cwd", settings.remote_dir]
    for setting in layout.given:
        command += ["--env", setting]
    return [*command, "--", *server]


def ring_hostfile(layout: Layout) -> dict:
    """mlx.launch's hostfile for HOSTS on the ring backend: one rank per host. The ring
    needs IP addresses; mlx.launch runs a host named 127.0.0.1 without ssh."""
    entries = []
    for host, machine in zip(layout.hosts, layout.machines):
        try:
            ips = [ip for ip in addresses(host.name) if ":" not in ip]
        except OSError as err:
            raise LaunchError(f"cannot resolve host {host.name!r} ({err}): use its IP address in HOSTS") from None
        if not ips:
            raise LaunchError(f"host {host.name!r} has no IPv4 address; the ring backend needs one")
        entries.append({"ssh": "127.0.0.1" if machine.is_local else host.ssh, "ips": ips[:1]})
    return {"backend": "ring", "hosts": entries}


def mpirun_command(layout: Layout, server: list[str]) -> list[str]:
    settings = layout.settings
    # Unbound: Open MPI pins each of 2 ranks to one core by default, while MLX and its
    # BLAS use every core, and ranks sharing a machine take turns on all of its cores.
    command = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(len(layout.machines))]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    if layout.remote_machines():
        hosts = ",".join("localhost" if m.is_local else m.name for m in layout.machines)
        command += ["--host", hosts, "--wdir", settings.remote_dir]
        if settings.ssh_user:
            command += ["--mca", "plm_rsh_args", f"-l {settings.ssh_user}"]
        for setting in layout.given:
            command += ["-x", setting]
    return [*command, *server]
