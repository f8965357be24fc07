"""Where each rank runs, this machine or a host over ssh, and what the launcher does
there: shell commands, its host tasks, paths as each host sees them, and the settings
file every host gets.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from config import REPO_DIR, Settings, settings_or_exit
from config.hosts import Host, HostsError
from launcher import LaunchError
from launcher.host_tasks import TASKS

# Key authentication only, and a quick failure when a host is down.
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
SSH_FAILED = 255  # ssh's exit status when it could not run the command


class HostUnreachable(Exception):
    """A host task could not be run on its host."""


def path_in(root: str, path: Path | str) -> str:
    """`path` of this machine as a host with the repository at `root` sees it: a path
    inside the repository is the same place in the host's copy."""
    try:
        inside = Path(path).relative_to(REPO_DIR)
    except ValueError:
        return str(path)
    return str(PurePosixPath(root, inside))


@dataclass(frozen=True)
class Machine:
    """This machine (ssh None), or a host reached over ssh with the repository at root."""

    ssh: Optional[str]
    root: str

    def __str__(self) -> str:
        return self.ssh or "local"

    @property
    def is_local(self) -> bool:
        return self.ssh is None

    @property
    def name(self) -> str:
        """The host's name or address, without the ssh user."""
        return (self.ssh or "localhost").rpartition("@")[2]

    def path(self, path: Path | str) -> str:
        return path_in(self.root, path)

    @property
    def python(self) -> str:
        return self.path(REPO_DIR / ".venv" / "bin" / "python")

    def shell(self, command: str, input: bytes = b"", capture: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command line here or over ssh."""
        argv = ["sh", "-c", command] if self.is_local else ["ssh", *SSH_OPTIONS, self.ssh, command]
        return subprocess.run(argv, input=input, capture_output=capture)

    def task(self, name: str, *args: Any) -> Any:
        """A host task's answer (launcher/host_tasks.py): run in this process here, and
        over ssh in the repository there, where the lines it logs are passed on."""
        if self.is_local:
            return json.loads(json.dumps(TASKS[name](*args)))
        proc = self.shell(f"cd {shlex.quote(self.root)} && {shlex.quote(self.python)} -m launcher.host_tasks "
                          f"{shlex.quote(name)} {shlex.quote(json.dumps(args))}")
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            raise HostUnreachable(f"{self}: {lines[-1] if lines else f'exit status {proc.returncode}'}")
        sys.stderr.write(proc.stderr.decode(errors="replace"))
        return json.loads(proc.stdout)

    def check(self, file: str, hint: str) -> None:
        """The host answers over ssh and has the executable `file`."""
        proc = self.shell(f"test -x {shlex.quote(file)}")
        if proc.returncode == SSH_FAILED:
            message = (proc.stderr or proc.stdout).decode(errors="replace").strip() or "no message"
            raise LaunchError(
                f"cannot reach {self} over ssh ({message}): check the address, that sshd runs there, and that "
                f"'ssh {self}' logs in without a password (ssh-copy-id; SSH_USER sets the user)"
            )
        if proc.returncode != 0:
            raise LaunchError(f"{self} has no {file}: {hint}")


HERE = Machine(None, str(REPO_DIR))


def addresses(host: str) -> list[str]:
    """The IP addresses of `host` (an IP or a name)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))


def is_local(host: str) -> bool:
    """Whether `host` is this machine: one of its addresses can be bound here."""
    try:
        ips = addresses(host)
    except OSError:
        return False
    for ip in ips:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((ip, 0))
                return True
            except OSError:
                continue
    return False


@dataclass
class Layout:
    """The settings, and where each rank runs."""

    settings: Settings
    hosts: list[Host]  # from HOSTS or HOSTFILE; empty for RANKS ranks on this machine
    machines: list[Machine]  # one per rank
    given: list[str]  # KEY=value settings given in the environment, for the processes on other hosts

    @property
    def rank0(self) -> Machine:
        return self.machines[0]

    def remote_machines(self) -> list[Machine]:
        """The distinct remote hosts, in rank order."""
        return list(dict.fromkeys(m for m in self.machines if not m.is_local))

    def remote_path(self, path: Path | str) -> str:
        return path_in(self.settings.remote_dir, path)

    def copy_env(self) -> None:
        """Every rank reads its settings file: the hosts get this machine's, so that all
        ranks agree (an empty one when there is none here, so that a stale copy cannot
        disagree). A special file such as /dev/null is the same everywhere: left alone."""
        source = Path(os.environ.get("MLX_RING_ENV_FILE") or REPO_DIR / ".env")
        if source.exists() and not source.is_file():
            return
        text = source.read_bytes() if source.exists() else b""
        dest = self.remote_path(source)
        temporary = f"{dest}.launch-{os.getpid()}"
        for machine in self.remote_machines():
            # Written beside and renamed: on a shared disk the source may be the destination.
            command = (f"mkdir -p {shlex.quote(str(PurePosixPath(dest).parent))} && cat >{shlex.quote(temporary)}"
                       f" && mv -f {shlex.quote(temporary)} {shlex.quote(dest)}")
            if machine.shell(command, input=text).returncode != 0:
                raise LaunchError(f"could not copy {source} to {machine}:{dest}")


def load_layout() -> Layout:
    """The settings (exit 2 naming a bad one) and the rank layout."""
    settings = settings_or_exit()
    try:
        hosts = settings.cluster_hosts()
    except HostsError as err:
        raise LaunchError(str(err)) from None
    if hosts:
        machines = [HERE if is_local(h.name) else Machine(h.ssh, settings.remote_dir) for h in hosts]
    else:
        machines = [HERE] * settings.ranks
    given = [f"{name}={os.environ[name]}" for name in (n.upper() for n in Settings.model_fields)
             if os.environ.get(name)]
    if os.environ.get("MLX_RING_ENV_FILE"):
        given.append(f"MLX_RING_ENV_FILE={path_in(settings.remote_dir, os.environ['MLX_RING_ENV_FILE'])}")
    return Layout(settings, hosts, machines, given)
