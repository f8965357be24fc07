"""The cluster's hosts in rank order, from HOSTS or HOSTFILE: the one parser that the
launcher and the ranks share.

HOSTFILE is mlx.launch's JSON, in either shape it reads: a list of hosts, or the object
that `mlx.distributed_config` writes, `{"backend": ..., "envs": [...], "hosts": [...]}`.
Each host has an "ssh" name and may list "ips" (and "rdma" devices, which only
mlx.launch reads). No MLX import here: the launcher reads hostfiles without it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_HOST_NAME = re.compile(r"[A-Za-z0-9.:-]+")


class HostsError(ValueError):
    """HOSTS or HOSTFILE cannot be read; the message names which."""


@dataclass(frozen=True)
class Host:
    """One host of the cluster, running one rank."""

    ssh: str  # how ssh reaches it: [user@]name
    ips: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The host name or address, without the ssh user."""
        return self.ssh.rpartition("@")[2]

    @property
    def address(self) -> str:
        """Where the other ranks reach it: its first IP, else its name."""
        return self.ips[0] if self.ips else self.name


def split_hosts(text: str) -> list[str]:
    """The names in HOSTS (comma-separated, in rank order), checked."""
    names = [name.strip() for name in text.split(",")] if text.strip() else []
    if not all(_HOST_NAME.fullmatch(name) for name in names):
        raise HostsError(f"must be comma-separated IP addresses or hostnames, in rank order; got {text!r}")
    return names


def parse_hostfile(data: object) -> list[Host]:
    """The hosts of a hostfile's parsed JSON, in either of mlx.launch's shapes."""
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise HostsError('expected a list of hosts, or an object with a "hosts" list')
    hosts = []
    for rank, entry in enumerate(entries):
        ssh = entry.get("ssh") if isinstance(entry, dict) else None
        if not isinstance(ssh, str) or not ssh:
            raise HostsError(f'host {rank} has no "ssh" name')
        ips = entry.get("ips") or []
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise HostsError(f'host {rank}: "ips" must be a list of addresses')
        hosts.append(Host(ssh, tuple(ips)))
    return hosts


def read_hostfile(path: Path) -> list[Host]:
    """The hosts HOSTFILE lists, in rank order."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise HostsError(f"HOSTFILE={path} does not exist: make one with mlx.distributed_config, or use HOSTS") from None
    except OSError as err:
        raise HostsError(f"HOSTFILE={path} cannot be read ({err})") from None
    try:
        hosts = parse_hostfile(json.loads(text))
    except ValueError as err:  # bad JSON, or a shape mlx.launch would not read
        raise HostsError(f"HOSTFILE={path}: not an mlx.launch hostfile ({err})") from None
    if not hosts:
        raise HostsError(f"HOSTFILE={path} lists no hosts")
    return hosts


def cluster_hosts(hosts: str, hostfile: Optional[Path], ssh_user: Optional[str]) -> list[Host]:
    """The hosts that HOSTS or HOSTFILE name, in rank order; empty when neither is set
    (every rank runs on this machine). SSH_USER applies to HOSTS; a hostfile's ssh names
    are used as written."""
    if hostfile is not None:
        return read_hostfile(hostfile)
    return [Host(f"{ssh_user}@{name}" if ssh_user else name) for name in split_hosts(hosts)]
