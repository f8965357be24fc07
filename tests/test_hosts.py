"""config/hosts.py: HOSTS and both shapes of mlx.launch's hostfile, as the launcher and
the ranks read them. The object shape is written by mlx's own Hostfile class, the one
`mlx.distributed_config` uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx._distributed_utils.common import Host as MlxHost
from mlx._distributed_utils.common import Hostfile

from config import load_settings
from config.hosts import Host, HostsError, cluster_hosts, parse_hostfile, read_hostfile

# What mlx.distributed_config writes for two Macs on Thunderbolt 5 (RDMA).
JACCL_HOSTS = [
    MlxHost(0, "mac1.local", ["192.168.10.1"], [None, "rdma_en2"]),
    MlxHost(1, "me@mac2.local", ["192.168.10.2"], ["rdma_en2", None]),
]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=4))
    return path


def test_object_hostfile_of_mlx_distributed_config(tmp_path: Path) -> None:
    data = Hostfile(JACCL_HOSTS, "jaccl", ["MLX_METAL_FAST_SYNCH=1"]).to_json()
    assert isinstance(data, dict) and data["backend"] == "jaccl"
    hosts = read_hostfile(write_json(tmp_path / "hostfile.json", data))
    assert hosts == [Host("mac1.local", ("192.168.10.1",)), Host("me@mac2.local", ("192.168.10.2",))]
    assert [h.name for h in hosts] == ["mac1.local", "mac2.local"]
    assert [h.address for h in hosts] == ["192.168.10.1", "192.168.10.2"]


def test_list_hostfile_reads_as_mlx_launch_reads_it(tmp_path: Path) -> None:
    entries = [{"ssh": "mac1", "ips": ["10.0.0.1", "10.0.1.1"]}, {"ssh": "mac2"}, {"ssh": "mac3", "ips": []}]
    path = write_json(tmp_path / "hostfile.json", entries)
    hosts = read_hostfile(path)
    assert [h.address for h in hosts] == ["10.0.0.1", "mac2", "mac3"]
    # mlx.launch's own parser agrees on names and addresses.
    theirs = Hostfile.from_file(path).hosts
    assert [(h.ssh_hostname, tuple(h.ips)) for h in theirs] == [(h.ssh, h.ips) for h in hosts]


def test_hosts_setting_with_ssh_user() -> None:
    assert cluster_hosts("10.0.0.1,mac2", None, "me") == [Host("me@10.0.0.1"), Host("me@mac2")]
    assert [h.address for h in cluster_hosts("10.0.0.1,mac2", None, None)] == ["10.0.0.1", "mac2"]
    assert cluster_hosts("", None, "me") == []


def test_settings_give_the_hostfiles_hosts(tmp_path: Path) -> None:
    path = write_json(tmp_path / "hostfile.json", Hostfile(JACCL_HOSTS, "jaccl").to_json())
    settings = load_settings(hostfile=path, ssh_user="ignored")
    assert [h.ssh for h in settings.cluster_hosts()] == ["mac1.local", "me@mac2.local"]


@pytest.mark.parametrize("data, error", [
    ({"backend": "ring"}, 'an object with a "hosts" list'),
    ("mac1", "a list of hosts"),
    ([{"ips": ["10.0.0.1"]}], 'host 0 has no "ssh" name'),
    ([{"ssh": "mac1", "ips": "10.0.0.1"}], '"ips" must be a list'),
])
def test_malformed_hostfile_is_refused(data: object, error: str) -> None:
    with pytest.raises(HostsError, match=error):
        parse_hostfile(data)


def test_hostfile_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(HostsError, match=f"HOSTFILE={missing} does not exist"):
        read_hostfile(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HostsError, match=f"HOSTFILE={bad}: not an mlx.launch hostfile"):
        read_hostfile(bad)
    with pytest.raises(HostsError, match="lists no hosts"):
        read_hostfile(write_json(tmp_path / "empty.json", {"backend": "ring", "hosts": []}))


def test_bad_hosts_setting_is_refused() -> None:
    with pytest.raises(HostsError, match="comma-separated"):
        cluster_hosts("mac1 mac2", None, None)
