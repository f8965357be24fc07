"""CPU used by an idle ring, and how soon a new request starts after idling.

Starts a serve-mode ring (MPI), waits until rank 0's heartbeat says ready, samples
every rank's CPU time over a quiet window, then submits requests straight into
the spool and measures submit → first token after a pause, against the same
prompt submitted back to back. Target: <= 5% of a core per idle rank; start delay
within one POLL_INTERVAL. Use a small model (--model) for the delay: prefill time noise on a
large one hides it.

    .venv/bin/python -m bench.idle_cpu [--ranks 2] [--seconds 10] [--model DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from bench.ring import TICKS, bench_env, cpu_ticks, mpi_ranks, start, stop
from spool import Spool


IDLE_PAUSE = 3.0  # seconds without work before a timed request


def cpu_seconds(pid: int) -> float:
    return cpu_ticks(pid) / TICKS


def rank_pids(launcher: int) -> list[int]:
    """The server.py processes under the launcher."""
    out = subprocess.run(["pgrep", "-f", "-P", str(launcher), "server.py"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def wait_ready(spool: Spool, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        beat = spool.read_heartbeat()
        if beat and beat.get("state") == "ready":
            return beat
        time.sleep(0.2)
    raise SystemExit("the ring did not become ready")


def first_token_delay(spool: Spool, prompt: list[int]) -> float:
    """Seconds from submit to the first delta event."""
    request = {"kind": "completion", "model": "bench", "prompt_tokens": prompt, "max_tokens": 2,
               "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
               "repetition_penalty": None, "seed": None, "stop": [], "created": 0}
    start = time.perf_counter()
    request_id = spool.submit(request)
    offset, first = 0, None
    while True:
        events, offset = spool.read_events(request_id, offset)
        for e in events:
            if e["type"] == "delta" and first is None:
                first = time.perf_counter() - start
            if e["type"] in ("final", "error"):
                return first if first is not None else time.perf_counter() - start
        time.sleep(0.0005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--model", help="mlx-lm model directory (default: the embedded default model)")
    args = parser.parse_args()

    spool_dir = Path(tempfile.mkdtemp(prefix="mlx-ring-bench-"))
    env = bench_env(args.model, SPOOL_DIR=str(spool_dir), POLL_INTERVAL=str(args.poll_interval))
    launcher = start(mpi_ranks(args.ranks), env)
    try:
        spool = Spool(spool_dir)
        print("waiting for the ring ...", flush=True)
        wait_ready(spool)
        pids = rank_pids(launcher.pid)
        time.sleep(1.0)  # past start-up's last heartbeat and log lines
        before = {p: cpu_seconds(p) for p in pids}
        print(f"sampling CPU of {len(pids)} idle ranks for {args.seconds:.0f}s ...", flush=True)
        time.sleep(args.seconds)
        usage = {p: (cpu_seconds(p) - before[p]) / args.seconds for p in pids}
        for i, (pid, share) in enumerate(sorted(usage.items())):
            print(f"  rank process {pid}: {100 * share:5.1f}% of a core (target <= 5%)")

        prompt = list(range(10, 42))
        busy = [first_token_delay(spool, prompt) for _ in range(3)]  # back to back
        idle = []
        for i in range(5):
            time.sleep(IDLE_PAUSE)
            idle.append(first_token_delay(spool, prompt))
        added = sorted(idle)[len(idle) // 2] - min(busy)
        print(f"submit → first token: back to back {1000 * min(busy):.1f} ms, after {IDLE_PAUSE:.0f} s idle "
              f"{', '.join(f'{1000 * x:.1f}' for x in idle)} ms")
        print(f"added by idling (median): {1000 * added:.1f} ms; POLL_INTERVAL {1000 * args.poll_interval:.0f} ms "
              f"-> {'within' if added <= args.poll_interval else 'OVER'} one poll interval")
        print(f"max idle CPU per rank: {100 * max(usage.values()):.1f}% of a core")
    finally:
        stop(launcher)

if __name__ == "__main__":
    main()
