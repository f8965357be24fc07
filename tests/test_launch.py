"""launch.sh with real processes: start, a chat completion over HTTP, status, restart with
a request queued while the ring is down, stop. Locally on MPI, and on three hosts made of
network namespaces, each with its own sshd, on the ring backend (and a shorter run on MPI).

Every run uses its own settings file, spool, logs and pid files (MLX_RING_ENV_FILE,
SPOOL_DIR, LOG_DIR, RUN_DIR) and a free API port, so a developer's `.env` or running
ring is never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
from mlx._distributed_utils.common import Host as MlxHost
from mlx._distributed_utils.common import Hostfile

from config import REPO_DIR, Settings
from config.blas import find_openblas

LAUNCH = REPO_DIR / "launch.sh"
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
START_TIMEOUT = 300  # seconds; the ranks load in a few on an idle machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports: mlx.launch gives rank r RING_PORT + r."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def pid_alive(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for its parent does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Launcher:
    """./launch.sh with settings of its own, and what it started."""

    def __init__(self, root: Path, model: Path, settings: dict[str, str]) -> None:
        self.root = root
        self.env_file = root / "settings.env"
        # The model comes from the settings file, the rest from the environment: both
        # sources of settings are exercised.
        self.env_file.write_text(f"MODEL_REPO={model}\nDEFAULT_MAX_TOKENS=8\n")
        self.model = str(model)
        env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
        self.env = env | {
            "MLX_RING_ENV_FILE": str(self.env_file),
            "SPOOL_DIR": str(root / "spool"),
            "LOG_DIR": str(root / "logs"),
            "RUN_DIR": str(root / "run"),
            "API_PORT": str(free_port()),
            "START_TIMEOUT": str(START_TIMEOUT),
        } | settings
        self.pids: set[int] = set()  # every pid it started that we saw

    def run(self, *args: str, timeout: float = START_TIMEOUT + 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(LAUNCH), *args], env=self.env | env, cwd=REPO_DIR, capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([str(LAUNCH), *args], env=self.env, cwd=REPO_DIR, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def heartbeat(self) -> dict:
        try:
            return json.loads((self.root / "spool" / "heartbeat.json").read_text())
        except (OSError, ValueError):
            return {}

    def recorded_pid(self, name: str) -> int | None:
        """The pid in RUN_DIR's pid file of the launcher, the API or the supervisor; None
        without one."""
        path = self.root / "run" / f"{name}.pid"
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return {"launcher": record.get("launcher"), "api": record.get("process"), "supervisor": record}[name]["pid"]

    def note_pids(self) -> None:
        """Remember the launcher's, the ranks', the API's and the supervisor's pids (all on
        this kernel)."""
        self.pids.update(pid for name in ("launcher", "api", "supervisor") if (pid := self.recorded_pid(name)))
        self.pids.update(r["pid"] for r in self.heartbeat().get("ranks", []))

    def chat(self, url: str, timeout: float = 120) -> httpx.Response:
        body = {"model": self.model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4,
                "temperature": 0}
        return httpx.post(f"{url}/chat/completions", json=body, timeout=timeout)

    def rank_log(self, rank: int) -> str:
        return (self.root / "logs" / f"rank{rank}.log").read_text()

    def cleanup(self) -> None:
        """stop, then SIGKILL whatever of ours survived it (only after a failed test)."""
        self.run("stop", timeout=120)
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, 9)


def check_ok(proc: subprocess.CompletedProcess, verb: str) -> None:
    assert proc.returncode == 0, f"launch.sh {verb} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def start(launcher: Launcher) -> str:
    """`start`, returning the API's base URL it printed."""
    proc = launcher.run("start")
    launcher.note_pids()
    check_ok(proc, "start")
    url = proc.stdout.strip().splitlines()[-1]
    assert url.startswith("http://") and url.endswith("/v1"), proc.stdout
    # By layers (pipeline) or by part of every layer (tensor, which PARALLEL=auto may pick).
    assert re.search(r"loading (layers|part)", proc.stderr), "start shows the ranks' loading lines"
    return url


def chat_works(launcher: Launcher, url: str) -> None:
    response = launcher.chat(url)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["model"] == launcher.model
    assert 1 <= reply["usage"]["completion_tokens"] <= 4


def restart_with_queued_request(launcher: Launcher, url: str) -> None:
    """`restart`; once rank 0 has stopped, a request goes in; the new ring answers it."""
    api_pid = launcher.recorded_pid("api")
    before = launcher.heartbeat()["time"]
    restart = launcher.popen("restart")
    deadline = time.monotonic() + 120
    while True:
        beat = launcher.heartbeat()
        if beat.get("time", 0) > before and beat.get("state") != "ready":
            break
        assert restart.poll() is None, f"restart ended early: {restart.communicate()}"
        assert time.monotonic() < deadline, "rank 0 did not stop"
        time.sleep(0.1)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(launcher.chat, url, START_TIMEOUT)
        out, err = restart.communicate(timeout=START_TIMEOUT + 120)
        launcher.note_pids()
        assert restart.returncode == 0, f"restart exited {restart.returncode}:\n{out}\n{err[-4000:]}"
        response = reply.result(timeout=120)
    assert beat["state"] in ("stopped", "loading"), beat
    assert response.status_code == 200, response.text
    request_id = response.json()["id"].removeprefix("chatcmpl-")
    assert request_id in launcher.rank_log(0), "the restarted rank 0 served the queued request"
    assert "API already running" in err and launcher.recorded_pid("api") == api_pid


def stop_leaves_nothing(launcher: Launcher) -> None:
    proc = launcher.run("stop", timeout=180)
    check_ok(proc, "stop")
    alive = {pid for pid in launcher.pids if pid_alive(pid)}
    assert not alive, f"still alive after stop: {alive}"
    assert not (launcher.root / "run" / "launcher.pid").exists()
    assert not (launcher.root / "run" / "supervisor.pid").exists()
    status = launcher.run("status", timeout=120)
    assert status.returncode != 0 and "ring: not running" in status.stdout


# ---------------------------------------------------------------------------
# Settings, usage, shell quality: quick, no ranks
# ---------------------------------------------------------------------------


def config_env(tmp_path: Path, file_text: str, **env: str) -> dict[str, str]:
    env_file = tmp_path / "settings.env"
    env_file.write_text(file_text)
    base = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
    return base | {"MLX_RING_ENV_FILE": str(env_file)} | env


def test_config_prints_settings_with_env_over_file(tmp_path: Path) -> None:
    env = config_env(tmp_path, "API_PORT=1111\nRANKS=2\nHOSTS=\n", RANKS="3", API_KEY="it's $HOME")
    proc = subprocess.run([sys.executable, "-m", "config"], env=env, cwd=REPO_DIR, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # What a script does with it: eval, then read the variables.
    shell = subprocess.run(["bash", "-c", 'eval "$1"; echo "$API_PORT $RANKS [$HOSTS] $REMOTE_DIR $API_KEY"',
                            "-", proc.stdout], capture_output=True, text=True)
    assert shell.stdout.strip() == f"1111 3 [] {REPO_DIR} it's $HOME"


@pytest.mark.parametrize("env, named", [({"RANKS": "0"}, "RANKS"), ({"START_TIMEOUT": "soon"}, "START_TIMEOUT"),
                                        ({"HOSTS": "a b"}, "HOSTS"), ({"REMOTE_DIR": "repo"}, "REMOTE_DIR"),
                                        ({"HOSTS": "10.0.0.1", "HOSTFILE": "h.json"}, "HOSTFILE")])
def test_bad_launch_setting_fails_naming_it(tmp_path: Path, env: dict, named: str) -> None:
    proc = subprocess.run([str(LAUNCH), "status"], env=config_env(tmp_path, "", **env), capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert f"{named}=" in proc.stderr, proc.stderr


def test_usage_without_a_verb() -> None:
    proc = subprocess.run([str(LAUNCH)], capture_output=True, text=True)
    assert proc.returncode != 0
    for verb in ("setup", "test", "start", "stop", "restart", "status", "logs"):
        assert f"  {verb}" in proc.stdout


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(LAUNCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_port_in_use_fails_before_starting(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    launcher = Launcher(tmp_path, tiny_models["llama"], {"RANKS": "2", "BACKEND": "mpi"})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(launcher.env["API_PORT"])))
        sock.listen()
        proc = launcher.run("start", timeout=120)
    assert proc.returncode == 1
    assert f"port {launcher.env['API_PORT']}" in proc.stderr and "API_PORT" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "launcher.pid").exists(), "nothing was started"


# ---------------------------------------------------------------------------
# Three local ranks on MPI
# ---------------------------------------------------------------------------


@pytest.fixture
def local_mpi(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Launcher]:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (./launch.sh setup installs openmpi-bin)")
    launcher = Launcher(tmp_path, tiny_models["llama"], {"RANKS": "3", "BACKEND": "mpi"})
    try:
        yield launcher
    finally:
        launcher.cleanup()


def test_local_mpi_start_status_restart_stop(local_mpi: Launcher) -> None:
    url = start(local_mpi)
    chat_works(local_mpi, url)
    status = local_mpi.run("status", timeout=120)
    check_ok(status, "status")
    rows = [line.split() for line in status.stdout.splitlines() if line[:1].isdigit()]
    assert [(r[0], r[-1]) for r in rows] == [("0", "yes"), ("1", "yes"), ("2", "yes")], status.stdout
    assert [r[4] for r in rows] == ["0-1", "2-3", "4-5"], "layer ranges"
    blas = "accelerate" if sys.platform != "linux" else "openblas" if find_openblas() else "reference"
    assert [r[6] for r in rows] == [blas] * 3, status.stdout
    # 4 attention heads do not divide among 3 ranks: PARALLEL=auto runs the pipeline.
    assert [r[7] for r in rows] == ["whole"] * 3, status.stdout
    assert "parallel: pipeline (PARALLEL=auto: the model cannot be split by tensor" in status.stdout
    assert "/health 200" in status.stdout
    assert f"supervisor: pid {local_mpi.recorded_pid('supervisor')}, watching; ring restarts 0" in status.stdout
    restart_with_queued_request(local_mpi, url)
    logs = local_mpi.run("logs", "-n", "5", timeout=60)
    check_ok(logs, "logs")
    assert all(f"==> {name} " in logs.stdout for name in ("rank0", "rank1", "rank2", "api"))
    stop_leaves_nothing(local_mpi)


def test_rank_failure_during_start_stops_everything(local_mpi: Launcher) -> None:
    # Rank 0 refuses a split that does not cover the model: its heartbeat says "failed".
    proc = local_mpi.run("start", LAYER_SPLIT="1,1,1")
    local_mpi.note_pids()
    assert proc.returncode == 1, proc.stderr
    assert "start failed: rank 0 failed" in proc.stderr and "==> rank 0 " in proc.stderr, proc.stderr
    assert "LAYER_SPLIT='1,1,1'" in proc.stderr
    assert not (local_mpi.root / "run" / "launcher.pid").exists()
    assert not (local_mpi.root / "run" / "api.pid").exists()
    assert not {pid for pid in local_mpi.pids if pid_alive(pid)}


# ---------------------------------------------------------------------------
# A hostfile as mlx.distributed_config writes it; pid files naming another process
# ---------------------------------------------------------------------------


def test_start_from_an_mlx_distributed_config_hostfile(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """HOSTFILE in the object shape of `mlx.distributed_config` (written by mlx's own class,
    here for jaccl over Thunderbolt, with RDMA devices and envs) on the ring backend, since
    jaccl needs RDMA hardware: the launcher and the ranks read the same hosts from it."""
    hosts = [MlxHost(0, "127.0.0.1", ["127.0.0.1"], [None, "rdma_en2"]),
             MlxHost(1, "127.0.0.1", ["127.0.0.1"], ["rdma_en2", None])]
    hostfile = tmp_path / "hostfile.json"
    hostfile.write_text(json.dumps(Hostfile(hosts, "jaccl", ["MLX_METAL_FAST_SYNCH=1"]).to_json(), indent=4))
    launcher = Launcher(tmp_path, tiny_models["llama"], {
        "HOSTFILE": str(hostfile), "BACKEND": "ring", "RING_PORT": str(free_ports(2)),
    })
    try:
        url = start(launcher)
        assert [r["rank"] for r in launcher.heartbeat()["ranks"]] == [0, 1]
        chat_works(launcher, url)
        stop_leaves_nothing(launcher)
    finally:
        launcher.cleanup()


def test_pid_files_naming_a_recycled_pid_are_not_ours(tmp_path: Path) -> None:
    """The pid files name a live process whose create time is not the recorded one: its
    pid was given to another process. status does not take it for ours; stop forgets the
    files and never signals it."""
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        then = {"pid": stranger.pid, "create_time": psutil.Process(stranger.pid).create_time() - 60}
        here = {"ssh": None, "root": str(REPO_DIR)}
        run = tmp_path / "run"
        run.mkdir()
        (run / "launcher.pid").write_text(json.dumps(
            {"launcher": then, "since": 0, "ranks": [{"machine": here, "process": then, "rank": 0}]}))
        (run / "api.pid").write_text(json.dumps({"machine": here, "process": then, "key": ""}))
        launcher = Launcher(tmp_path, tmp_path / "no-model", {})
        status = launcher.run("status", timeout=60)
        assert status.returncode == 1
        assert "ring: not running" in status.stdout and "api: not running" in status.stdout, status.stdout
        check_ok(launcher.run("stop", timeout=60), "stop")
        time.sleep(0.5)  # a signal, had one been sent, has arrived
        assert stranger.poll() is None, "the stranger was signalled"
        assert not (run / "launcher.pid").exists() and not (run / "api.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


# ---------------------------------------------------------------------------
# Three hosts: network namespaces with an sshd each, ranks over ssh on the ring backend
# ---------------------------------------------------------------------------


class Hosts:
    """Three network namespaces on a bridge, 10.77.N.1-3 (the bridge is 10.77.N.254 here),
    each running an sshd that accepts one temporary key; `bin/ssh` wraps ssh with the
    matching client configuration (mlx.launch calls plain `ssh`, so it goes first on PATH).
    Namespaces share the file system, so the repository is at the same path "there"."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tag = f"mlr{os.getpid() % 100000}"
        self.bridge = f"{tag}b"
        self.names = [f"{tag}h{i}" for i in (1, 2, 3)]
        self.subnet = self._free_subnet()
        self.ips = [f"{self.subnet}.{i}" for i in (1, 2, 3)]
        self.sshd: list[subprocess.Popen] = []
        self.bin = root / "bin"

    @staticmethod
    def _free_subnet() -> str:
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        for n in range(os.getpid() % 200, 256):
            if f" 10.77.{n}." not in used:
                return f"10.77.{n}"
        raise RuntimeError("no free 10.77.N.0/24 subnet")

    def create(self) -> None:
        ip = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True)  # noqa: E731
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.ips), start=1):
            ip("netns", "add", ns)
            veth = f"{self.bridge[:-1]}v{i}"
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        self._keys()
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        for ns, addr in zip(self.names, self.ips):
            config = self.root / f"sshd-{addr}.conf"
            config.write_text(
                f"ListenAddress {addr}\nHostKey {self.root}/host_key\nPidFile {self.root}/sshd-{addr}.pid\n"
                f"AuthorizedKeysFile {self.root}/id.pub\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            )
            log = open(self.root / f"sshd-{addr}.log", "wb")
            self.sshd.append(subprocess.Popen(["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f",
                                               str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL))
        self._wait_for_ssh()

    def _keys(self) -> None:
        for name in ("host_key", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)], check=True)
        host_key = " ".join((self.root / "host_key.pub").read_text().split()[:2])
        (self.root / "known_hosts").write_text(f"{','.join(self.ips)} {host_key}\n")
        (self.root / "ssh_config").write_text(
            f"Host {self.subnet}.*\n  IdentityFile {self.root}/id\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.root}/known_hosts\n  StrictHostKeyChecking yes\n"
        )
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {self.root}/ssh_config "$@"\n')
        wrapper.chmod(0o755)

    def ssh(self, addr: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "ssh"), "-o", "BatchMode=yes", f"root@{addr}", command],
                              capture_output=True, text=True, timeout=30)

    def _wait_for_ssh(self) -> None:
        deadline = time.monotonic() + 30
        for addr in self.ips:
            while self.ssh(addr, "true").returncode != 0:
                assert time.monotonic() < deadline, (self.root / f"sshd-{addr}.log").read_text()
                time.sleep(0.2)

    @staticmethod
    def pids(ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def foreign_pids(self) -> dict[str, list[str]]:
        """Per namespace, the command lines of live processes other than its sshd listener."""
        listeners = {p.pid for p in self.sshd}
        found = {}
        for ns in self.names:
            found[ns] = [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in self.pids(ns)
                         if pid not in listeners and pid_alive(pid)]
        return found

    def destroy(self) -> None:
        for ns in self.names:
            for pid in self.pids(ns):  # everything in our namespaces is ours
                os.kill(pid, 9)
        for proc in self.sshd:
            proc.wait(timeout=10)
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot build the hosts, or None."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 to create network namespaces"
    probe = f"mlr-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    if not Path("/usr/sbin/sshd").exists():
        message = "no /usr/sbin/sshd: apt-get install openssh-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    made = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        made.create()
        yield made
    finally:
        made.destroy()


@pytest.fixture
def ring_on_hosts(hosts: Hosts, tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path, tiny_models["llama"], {
        "HOSTS": ",".join(hosts.ips), "SSH_USER": "root", "BACKEND": "ring", "API_HOST": "0.0.0.0",
    })
    launcher.env["PATH"] = f"{hosts.bin}:{launcher.env['PATH']}"
    try:
        yield launcher
    finally:
        launcher.cleanup()


def test_three_hosts_over_ssh_start_restart_stop(ring_on_hosts: Launcher, hosts: Hosts) -> None:
    check_ok(ring_on_hosts.run("setup", "--all-hosts", timeout=300), "setup --all-hosts")
    url = start(ring_on_hosts)
    # The API runs on rank 0's host, next to its spool.
    assert url == f"http://{hosts.ips[0]}:{ring_on_hosts.env['API_PORT']}/v1"
    api_pid = ring_on_hosts.recorded_pid("api")
    assert api_pid in hosts.pids(hosts.names[0])
    # Each rank in its own namespace, in HOSTS order.
    assert all(r["pid"] in hosts.pids(ns) for r, ns in zip(ring_on_hosts.heartbeat()["ranks"], hosts.names))
    chat_works(ring_on_hosts, url)
    status = ring_on_hosts.run("status", timeout=120)
    check_ok(status, "status")
    restart_with_queued_request(ring_on_hosts, url)
    stop_leaves_nothing(ring_on_hosts)
    assert hosts.foreign_pids() == {ns: [] for ns in hosts.names}


def test_three_hosts_over_ssh_on_mpi(hosts: Hosts, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """mpirun's own ssh start, its host list and its -x settings."""
    launcher = Launcher(tmp_path, tiny_models["llama"], {
        "HOSTS": ",".join(hosts.ips), "SSH_USER": "root", "BACKEND": "mpi", "API_HOST": "0.0.0.0",
    })
    launcher.env["PATH"] = f"{hosts.bin}:{launcher.env['PATH']}"
    try:
        url = start(launcher)
        assert all(r["pid"] in hosts.pids(ns) for r, ns in zip(launcher.heartbeat()["ranks"], hosts.names))
        chat_works(launcher, url)
        stop_leaves_nothing(launcher)
        assert hosts.foreign_pids() == {ns: [] for ns in hosts.names}
    finally:
        launcher.cleanup()


def test_unreachable_host_is_reported_before_starting(ring_on_hosts: Launcher, hosts: Hosts) -> None:
    unused = f"{hosts.subnet}.9"
    proc = ring_on_hosts.run("start", HOSTS=f"{hosts.ips[0]},{unused}", timeout=120)
    assert proc.returncode == 1
    assert f"cannot reach root@{unused} over ssh" in proc.stderr, proc.stderr
    assert not (ring_on_hosts.root / "run" / "launcher.pid").exists()
