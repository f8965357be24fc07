"""Small tasks of launch.sh that want Python: run on this machine, or on a host over ssh.

    launch_helper.py spawn LOG -- CMD...     start CMD detached (own session), print its pid
    launch_helper.py mlx-launch ARGS...      mlx.launch without its busy I/O loop
    launch_helper.py hostfile USER HOST...   an mlx.launch ring hostfile (USER may be empty)
    launch_helper.py hostfile-hosts FILE     the ssh names in an mlx.launch hostfile
    launch_helper.py local HOST...           "local" or "remote" for each host, on one line
    launch_helper.py port-free HOST PORT     exit 0 if HOST:PORT can be bound here
    launch_helper.py heartbeat SPOOL_DIR     rank 0's heartbeat as shell assignments
    launch_helper.py health URL              GET URL: prints "STATUS reason", exit 0 on 200

Only the standard library (and mlx for mlx-launch), so each call starts quickly.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def spawn(log: str, command: list[str]) -> int:
    """Start `command` in a new session, so that it outlives launch.sh and the terminal,
    and its process group (id = its pid) holds what it starts."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    print(proc.pid)
    return 0


def quiet_mlx_launch(args: list[str]) -> int:
    """mlx.launch (mlx 0.32.4) selects on its ranks' stdin pipes for writing, always
    ready, and on its own stdin: with nothing to forward it spins a whole core for the life
    of the ring (measured here: 100-130% CPU). Nothing is forwarded to the ranks' stdin,
    so wait for their output only."""
    from mlx._distributed_utils import launch

    real_select = launch.select
    stdin = sys.stdin.fileno()

    def select(rlist, wlist, xlist, timeout):
        return real_select([fd for fd in rlist if fd != stdin], [], xlist, timeout)

    launch.select = select
    sys.argv = ["mlx.launch", *args]
    launch.main()
    return 0


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
        ips = addresses(host.rpartition("@")[2])
    except OSError:
        return False
    for ip in ips:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((ip, 0))
                return True
            except OSError:
                continue
    return False


def ring_hostfile(ssh_user: str, hosts: list[str]) -> dict:
    """mlx.launch's hostfile for the ring backend: one rank per host. The ring needs IP
    addresses; mlx.launch runs a host named 127.0.0.1 without ssh."""
    entries = []
    for host in hosts:
        try:
            ips = [ip for ip in addresses(host) if ":" not in ip]
        except OSError as err:
            raise SystemExit(f"cannot resolve host {host!r} ({err}): use its IP address in HOSTS")
        if not ips:
            raise SystemExit(f"host {host!r} has no IPv4 address; the ring backend needs one")
        ssh = "127.0.0.1" if is_local(host) else (f"{ssh_user}@{host}" if ssh_user else host)
        entries.append({"ssh": ssh, "ips": ips[:1]})
    return {"backend": "ring", "hosts": entries}


def hostfile_hosts(path: str) -> list[str]:
    """The ssh names of an mlx.launch hostfile, in rank order."""
    try:
        data = json.loads(Path(path).read_text())
        hosts = data["hosts"] if isinstance(data, dict) else data
        return [str(h["ssh"]) for h in hosts]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"HOSTFILE={path}: not a readable mlx.launch hostfile ({err})")


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


def heartbeat(spool_dir: str) -> list[str]:
    """Shell assignments from rank 0's heartbeat: hb_ms (its time), hb_age (by this host's clock),
    hb_state, hb_model, hb_active, hb_reason, hb_mode and hb_parallel (how the ranks share the
    model, and why), and hb_ranks ("rank pid start-end memory host blas shard", the BLAS's kind
    without its library path: openblas, reference, accelerate; shard: "whole" layers, or "k/N",
    the k-th of N parts of each)."""
    try:
        beat = json.loads((Path(spool_dir) / "heartbeat.json").read_bytes())
    except (OSError, ValueError):
        beat = {}
    if not isinstance(beat, dict):
        beat = {}
    when = beat.get("time") if isinstance(beat.get("time"), (int, float)) else 0
    ranks = []
    for r in beat.get("ranks") or []:
        start, end = (r.get("layers") or [0, 0])[:2]
        memory = f"{r.get('memory', 0) / 2**30:.1f}GiB"
        blas = str(r.get("blas") or "?").split(" ")[0] or "?"
        index, parts = (r.get("shard") or [0, 1])[:2]
        shard = "whole" if parts == 1 else f"{index + 1}/{parts}"
        ranks.append(f"{r.get('rank')} {r.get('pid')} {start}-{end - 1} {memory} {r.get('host')} {blas} {shard}")
    parallel = beat.get("parallel") if isinstance(beat.get("parallel"), dict) else {}
    values = {
        "hb_ms": str(int(when * 1000)),
        "hb_age": f"{time.time() - when:.1f}" if when else "",
        "hb_state": str(beat.get("state", "")),
        "hb_model": str(beat.get("model", "")),
        "hb_active": str(beat.get("active", "")),
        "hb_reason": str(beat.get("reason", "")),
        "hb_mode": str(parallel.get("mode", "")),
        "hb_parallel": parallel_summary(parallel),
    }
    lines = [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    lines.append("hb_ranks=(" + " ".join(shlex.quote(r) for r in ranks) + ")")
    return lines


def parallel_summary(parallel: dict) -> str:
    """One line: the mode, PARALLEL, the reason, and auto's link figures when measured."""
    if not parallel:
        return ""
    line = f"{parallel.get('mode')} (PARALLEL={parallel.get('requested')}: {parallel.get('reason')}"
    if "all_reduce_us" in parallel:
        line += f"; all-reduce {parallel['all_reduce_us']} us, {parallel.get('bandwidth_mb_s')} MB/s"
    return line + ")"


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


def main(argv: list[str]) -> int:
    verb, args = (argv[0], argv[1:]) if argv else ("", [])
    if verb == "spawn" and len(args) >= 3 and args[1] == "--":
        return spawn(args[0], args[2:])
    if verb == "mlx-launch":
        return quiet_mlx_launch(args)
    if verb == "hostfile" and len(args) >= 2:
        print(json.dumps(ring_hostfile(args[0], args[1:]), indent=1))
        return 0
    if verb == "hostfile-hosts" and len(args) == 1:
        print("\n".join(hostfile_hosts(args[0])))
        return 0
    if verb == "local" and args:
        print(" ".join("local" if is_local(h) else "remote" for h in args))
        return 0
    if verb == "port-free" and len(args) == 2:
        return 0 if port_free(args[0], int(args[1])) else 1
    if verb == "heartbeat" and len(args) == 1:
        print("\n".join(heartbeat(args[0])))
        return 0
    if verb == "health" and len(args) == 1:
        status, reason = health(args[0])
        print(status, reason)
        return 0 if status == 200 else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
